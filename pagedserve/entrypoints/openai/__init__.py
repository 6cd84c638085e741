"""OpenAI-compatible HTTP server: `pagedserve serve` (cli), the app (api_server), the wire format
(protocol), the two generation endpoints (serving_completion, serving_chat) and their errors."""
