"""Prompt text for the chapter's request templates: real sentences of varied length, built from topic
lists and sentence fragments with a seeded `random.Random`, so a workload is reproducible and its
prompts range from a short question (~20 tokens) to a pasted article (~300 tokens).
"""

from __future__ import annotations

import random
from collections.abc import Callable

TOPICS = [
    "photosynthesis", "the French Revolution", "binary search trees", "compound interest", "the water cycle",
    "public key cryptography", "sourdough baking", "plate tectonics", "the immune system", "supply and demand",
    "black holes", "container orchestration", "the Roman Empire", "machine translation", "urban beekeeping",
    "climate adaptation in coastal cities", "the Renaissance", "electric vehicles", "sleep and memory",
    "jazz improvisation", "coral reefs", "quantum computing", "the printing press", "vaccines",
    "microservice architectures", "grid-scale energy storage", "volcanoes", "game theory", "the Silk Road",
    "neural networks", "ocean currents", "inflation", "chess openings", "marathon training", "index funds",
    "antibiotic resistance", "medieval castles", "plastic recycling", "the human genome", "wind turbines",
    "garbage collection in programming languages", "the history of jazz", "soil erosion", "public transport",
]

ASPECTS = [
    "its history", "the main trade-offs", "how it is measured", "the most common misconceptions",
    "its effect on everyday life", "the costs involved", "the underlying mechanism", "recent research",
    "the safety concerns", "the role of regulation", "what experts still disagree about",
    "how it might change over the next decade", "the environmental impact", "the ethical questions",
    "how beginners usually get started", "the mathematics behind it",
]

AUDIENCES = [
    "high school students", "a group of retired engineers", "busy managers", "first-year university students",
    "a curious ten-year-old", "software developers", "nurses working night shifts", "small business owners",
    "people who have never studied science", "a book club", "new employees on their first day",
]

PLACES = [
    "Lisbon", "a small town in Ohio", "Kyoto", "a research station in Antarctica", "Nairobi",
    "a fishing village in Norway", "Buenos Aires", "a university lab in Zurich", "Mumbai", "rural Scotland",
]

CHARACTERS = [
    "a retired lighthouse keeper", "a nervous apprentice chef", "a girl who collects broken clocks",
    "an astronaut on her last mission", "a street musician", "a night-shift librarian", "a stubborn old cat",
    "two rival beekeepers", "a robot that cannot read", "a detective who is afraid of the dark",
]

TONES = ["hopeful", "melancholic", "funny", "suspenseful", "gentle", "dry and ironic"]

CODE_TASKS = [
    "parsing a CSV file of sales records and computing monthly totals",
    "a command-line tool that renames photos by the date they were taken",
    "an LRU cache with a fixed capacity",
    "checking whether a string of brackets is balanced",
    "reading a local JSON file of users and printing the five oldest",
    "a small tokenizer for arithmetic expressions",
    "merging overlapping time intervals",
    "a rate limiter that allows N calls per second",
    "computing the shortest path in a weighted graph",
    "validating email addresses without a regular expression library",
    "a text-based tic-tac-toe game",
    "splitting a large log file into chunks by date",
]

CODE_REQUIREMENTS = [
    "Use type hints on every function.", "Include a short docstring for each public function.",
    "Handle empty input gracefully.", "Add a few unit tests using pytest.", "Avoid third-party libraries.",
    "Keep the main logic in a function that can be imported.", "Explain the time complexity in a comment.",
    "Raise a clear ValueError for invalid arguments.", "Make it work on Python 3.10 and later.",
    "Print a helpful usage message when it is run without arguments.",
]

CONTEXT_SENTENCES = [
    "I have been reading about {topic} for a few weeks and I am still confused about {aspect}.",
    "My colleague asked me about {topic} yesterday, and I could not give a clear answer.",
    "Most introductions to {topic} skip over {aspect}, which is the part I care about most.",
    "Please keep in mind that the audience is {audience}.",
    "The explanation should avoid jargon where possible and use at least one concrete example.",
    "We discussed {topic} in a meeting last week and disagreed about {aspect}.",
    "There are at least {number} different ways to look at {aspect}, and I would like to understand the main ones.",
    "A friend who lives in {place} told me that people there think about {topic} very differently.",
    "I am preparing a short talk for {audience}, so clarity matters more than completeness.",
    "If there is a common mistake people make when thinking about {topic}, please point it out.",
    "I already know the basics, so feel free to go a little deeper into {aspect}.",
    "It would help to compare {topic} with something familiar from daily life.",
]

ARTICLE_SENTENCES = [
    "Researchers studying {topic} have long argued that {aspect} matters more than it first appears.",
    "A survey of {number} people in {place} found that most had heard of {topic}, but few could explain {aspect}.",
    "The first serious studies of {topic} appeared in {year}, when a small team in {place} published "
    "a paper that was largely ignored at the time.",
    "Critics point out that public debate about {topic} often confuses {aspect} with {aspect2}.",
    "Supporters reply that the evidence on {aspect} has become much stronger over the past decade.",
    "In {place}, local officials have started a programme that puts {topic} at the centre of their planning.",
    "The costs are not trivial: one estimate puts them at {number} million euros a year for a mid-sized region.",
    "Several experts interviewed for this article said that {aspect2} is where the next breakthroughs will come from.",
    "Not everyone is convinced, and a vocal minority argue that the whole field is moving too quickly.",
    "Teachers report that students find {topic} fascinating once they see a practical example.",
    "A new report published in {year} recommends that governments invest more in understanding {aspect}.",
    "The story of {topic} is also a story about how ideas spread between countries and disciplines.",
    "For now, the consensus is cautious: progress is real, but {aspect} remains poorly understood.",
    "Journalists covering {topic} have sometimes exaggerated the results, which has not helped public trust.",
    "Meanwhile, companies in {place} are already selling products that rely on {topic}.",
]

PLAIN_SENTENCES = [
    "The train to the coast leaves every morning at seven.",
    "Our meeting has been moved to Thursday afternoon because the room was already booked.",
    "Please remember to water the plants while I am away on holiday.",
    "The museum is closed on Mondays, but the garden stays open until sunset.",
    "I would like to order two coffees and a slice of the lemon cake, please.",
    "The weather forecast says it will rain for most of the weekend.",
    "Thank you for your letter; I was very happy to hear about your new job.",
    "The library has extended its opening hours during the exam period.",
    "Could you tell me where the nearest pharmacy is?",
    "We are planning a small party for my grandmother's ninetieth birthday.",
    "The software update fixes several bugs and makes the application start faster.",
    "Children under twelve can visit the exhibition for free.",
]


def _fill(rng: random.Random, template: str, topic: str) -> str:
    a1, a2 = rng.sample(ASPECTS, 2)
    return template.format(topic=topic, aspect=a1, aspect2=a2, audience=rng.choice(AUDIENCES),
                           place=rng.choice(PLACES), number=rng.randint(3, 900), year=rng.randint(1950, 2023))


def _grow(rng: random.Random, parts: list[str], pool: list[str], topic: str, target_words: int) -> str:
    """Append distinct sentences from `pool` until the text reaches about `target_words` words."""
    order = rng.sample(pool, len(pool))
    i = 0
    while sum(len(p.split()) for p in parts) < target_words:
        parts.append(_fill(rng, order[i % len(order)], topic))
        i += 1
    return " ".join(parts)


def what_is(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    parts = [] if rng.random() < 0.25 else [_fill(rng, rng.choice(CONTEXT_SENTENCES), topic)]
    parts.append(f"What is {topic}?")
    parts.append(rng.choice(["Answer in a few sentences.", "Keep the answer short and simple.",
                             "One paragraph is enough.", "Please give a brief definition and one example."]))
    return " ".join(parts)


def explain(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    return _grow(rng, [f"Explain the concept of {topic}."], CONTEXT_SENTENCES, topic, rng.randint(25, 110))


def short_story(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    parts = [f"Write a short story about {rng.choice(CHARACTERS)} who becomes obsessed with {topic}.",
             f"The story takes place in {rng.choice(PLACES)} in {rng.randint(1890, 2080)}.",
             f"Use a {rng.choice(TONES)} tone."]
    extras = ["Give the main character a secret that is revealed at the end.",
              "Include at least one line of dialogue.", "Keep it under five hundred words.",
              "End with an image rather than a moral.", "Tell it in the first person.",
              "Start in the middle of the action.", "Mention the smell of rain somewhere."]
    return _grow(rng, parts, extras, topic, rng.randint(25, 70))


def python_code(rng: random.Random) -> str:
    parts = [f"Generate Python code for {rng.choice(CODE_TASKS)}.", "Requirements:"]
    for req in rng.sample(CODE_REQUIREMENTS, rng.randint(1, 6)):
        parts.append(f"- {req}")
    return "\n".join(parts)


def summarize(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    intro = f"Summarize this article in {rng.randint(2, 5)} sentences:\n\n"
    return intro + _grow(rng, [], ARTICLE_SENTENCES, topic, rng.randint(110, 220))


def translate(rng: random.Random) -> str:
    sentences = rng.sample(PLAIN_SENTENCES, rng.randint(2, 5))
    return "Translate to French: " + " ".join(sentences)


def analysis(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    aspects = rng.sample(ASPECTS, rng.randint(2, 5))
    parts = [f"Write a detailed analysis of {topic}.", "Cover the following points: " + "; ".join(aspects) + "."]
    return _grow(rng, parts, CONTEXT_SENTENCES + ARTICLE_SENTENCES, topic, rng.randint(45, 160))


def guide(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    sections = rng.sample(["an overview", "key terms", "a step-by-step plan", "common mistakes", "tools and resources",
                           "a checklist", "frequently asked questions", "worked examples", "further reading"],
                          rng.randint(3, 6))
    parts = [f"Create a comprehensive guide to {topic} for {rng.choice(AUDIENCES)}.",
             "Organise it into sections: " + ", ".join(sections) + "."]
    return _grow(rng, parts, CONTEXT_SENTENCES, topic, rng.randint(40, 140))


# The chapter's eight request templates with their output-length ranges (tokens).
CHAPTER_TEMPLATES: list[tuple[str, tuple[int, int], Callable[[random.Random], str]]] = [
    ("Write a short story about", (50, 150), short_story),
    ("Explain the concept of", (100, 300), explain),
    ("Generate Python code for", (20, 100), python_code),
    ("Summarize this article", (50, 200), summarize),
    ("Translate to French:", (10, 50), translate),
    ("Write a detailed analysis", (200, 500), analysis),
    ("What is", (10, 30), what_is),
    ("Create a comprehensive guide", (300, 800), guide),
]
