"""Scale-out: a router in front of several engines (tiers, balancing policies, health, KV-aware
routing) and an autoscaler. Everything here talks to engines over HTTP only (`pagedserve serve`)."""
