"""Real English text for benchmark prompts (token slices of it give prompts of any length)."""

CORPUS = (
    "The history of computing is a story of people trying to make machines do arithmetic faster and more "
    "reliably. Early mechanical calculators gave way to electronic computers during the Second World War, "
    "and the invention of the transistor made them smaller, cheaper and far more dependable. Programming "
    "languages grew from raw machine code into assembly, then into compiled languages that let engineers "
    "describe algorithms in terms closer to mathematics. Operating systems learned to share one processor "
    "among many programs, networks connected machines across continents, and the web turned documents into "
    "applications. Today large language models predict the next word of a text with billions of learned "
    "parameters, and serving them efficiently means caring about memory bandwidth, batching and latency. "
    "Gardening, by contrast, rewards patience: soil must be prepared, seeds sown at the right depth, and "
    "seedlings watered without drowning their roots. A vegetable bed needs sun for most of the day, while "
    "ferns and hostas prefer the shade under trees. Compost returns nutrients to the ground, and rotating "
    "crops each year keeps pests and diseases from settling in. Cooks know that the same tomato tastes "
    "different in August than in January, and that a pinch of salt can change a whole dish. "
)


def corpus_token_ids(tokenizer) -> list[int]:
    return tokenizer.encode(CORPUS * 4)
