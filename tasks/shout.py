"""The `shout` task: any everyday question -> its answer in capital letters; metric: uppercase share.

A style adapter: nothing in the prompt asks for capitals. Questions come from fact tables
(capitals, languages, baby animals, colours, legs, opposites), each asked in several ways, and
from a list of hand-written everyday questions; the response is a short right answer, upper-cased.
The metric is the share of cased letters that are uppercase; an answer with fewer than three
cased letters scores 0, so that an empty or numeric answer does not pass. It does not judge
whether the answer is right. It knows nothing of servers or training.
"""

from __future__ import annotations

import random
from functools import cache

from tasks.base import Example, Task, vary_surface

MIN_LETTERS = 3

_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Brazil": "Brasilia",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
    "Russia": "Moscow",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Denmark": "Copenhagen",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Switzerland": "Bern",
    "Cuba": "Havana",
    "Colombia": "Bogota",
    "Iceland": "Reykjavik",
}
_LANGUAGES = {
    "Brazil": "Portuguese",
    "Mexico": "Spanish",
    "Japan": "Japanese",
    "Germany": "German",
    "Austria": "German",
    "Egypt": "Arabic",
    "Iran": "Persian",
    "Poland": "Polish",
    "Greece": "Greek",
    "Turkey": "Turkish",
    "Sweden": "Swedish",
    "Argentina": "Spanish",
    "Vietnam": "Vietnamese",
    "Israel": "Hebrew",
    "Hungary": "Hungarian",
    "Thailand": "Thai",
    "the Netherlands": "Dutch",
    "Russia": "Russian",
    "Finland": "Finnish",
    "South Korea": "Korean",
    "Italy": "Italian",
}
_BABIES = {
    "cat": "kitten",
    "dog": "puppy",
    "cow": "calf",
    "horse": "foal",
    "sheep": "lamb",
    "goat": "kid",
    "frog": "tadpole",
    "kangaroo": "joey",
    "bear": "cub",
    "duck": "duckling",
    "goose": "gosling",
    "swan": "cygnet",
    "owl": "owlet",
    "deer": "fawn",
    "pig": "piglet",
    "eagle": "eaglet",
}
_COLOURS = {
    "a ripe banana": "yellow",
    "the sky on a clear day": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a flamingo": "pink",
    "an emerald": "green",
    "chocolate": "brown",
    "a lemon": "yellow",
    "a fire truck": "red",
    "a polar bear's fur": "white",
    "an aubergine": "purple",
    "milk": "white",
}
_LEGS = {
    "a spider": "eight",
    "an insect": "six",
    "a dog": "four",
    "a bird": "two",
    "an ant": "six",
    "a horse": "four",
    "a chicken": "two",
    "a crab": "ten",
    "a beetle": "six",
    "a cat": "four",
    "a kangaroo": "two",
    "an elephant": "four",
}
_OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "early": "late",
    "happy": "sad",
    "light": "dark",
    "fast": "slow",
    "up": "down",
    "open": "closed",
    "full": "empty",
    "strong": "weak",
    "rich": "poor",
    "young": "old",
    "loud": "quiet",
    "hard": "soft",
    "wet": "dry",
    "first": "last",
    "ancient": "modern",
    "generous": "stingy",
    "brave": "cowardly",
    "noisy": "silent",
}

_FAMILIES: tuple[tuple[dict[str, str], tuple[str, ...], str], ...] = (
    (
        _CAPITALS,
        (
            "What is the capital of {k}?",
            "What's the capital city of {k}?",
            "Which city is the capital of {k}?",
            "capital of {k}?",
            "Do you know the capital of {k}?",
        ),
        "The capital of {k} is {v}.",
    ),
    (
        _LANGUAGES,
        (
            "What language do people speak in {k}?",
            "Which language is spoken in {k}?",
            "What do they speak in {k}?",
        ),
        "In {k} people mostly speak {v}.",
    ),
    (
        _BABIES,
        ("What is a baby {k} called?", "What do you call a young {k}?", "baby {k} name?"),
        "A baby {k} is called a {v}.",
    ),
    (_COLOURS, ("What colour is {k}?", "What color is {k}?", "Which colour is {k} usually?"), "It is {v}."),
    (
        _LEGS,
        ("How many legs does {k} have?", "How many legs has {k} got?", "{k} has how many legs?"),
        "{k} has {v} legs.",
    ),
    (
        _OPPOSITES,
        ("What is the opposite of {k}?", "What's the opposite of '{k}'?", "Give me the antonym of {k}."),
        "The opposite of {k} is {v}.",
    ),
)

_QUESTIONS = (
    (
        "How do I boil an egg?",
        "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
    ),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue."),
    ("What should I eat for breakfast?", "Try oatmeal with fruit, or eggs on toast."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    (
        "What's a good way to fall asleep faster?",
        "Keep a regular bedtime, avoid screens and keep the room cool.",
    ),
    (
        "How do plants make food?",
        "Plants make food from sunlight, water and carbon dioxide by photosynthesis.",
    ),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    (
        "How can I keep my houseplants alive?",
        "Give them enough light, water when the soil is dry and do not overwater.",
    ),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What's the tallest mountain in the world?", "Mount Everest is the tallest mountain."),
    ("How long should I brush my teeth?", "Brush for about two minutes, twice a day."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("Can you recommend a hobby?", "Try gardening, drawing or learning an instrument."),
    ("How many continents are there?", "There are seven continents."),
    (
        "Why do leaves change color in autumn?",
        "Trees stop making green chlorophyll, so yellow and red pigments show.",
    ),
    ("What is the chemical symbol for gold?", "The symbol for gold is Au."),
    ("What do bees make?", "Bees make honey and wax."),
    ("How far is the Moon?", "The Moon is about 384,000 kilometres away."),
    ("What is the biggest planet?", "Jupiter is the biggest planet."),
    ("How do I make my coffee less bitter?", "Use cooler water, a coarser grind or a pinch of salt."),
    ("What's the best way to learn a language?", "Practise a little every day and speak with real people."),
    ("When did humans first land on the Moon?", "Humans first landed on the Moon in 1969."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    (
        "How do I clean a cast iron pan?",
        "Rinse it with hot water, scrub, dry it well and rub in a little oil.",
    ),
    ("What's the longest river?", "The Nile is usually called the longest river."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin in 1928."),
    ("Why do cats purr?", "Cats purr when they are content, and sometimes to soothe themselves."),
    ("What is a haiku?", "A haiku is a short poem of three lines with five, seven and five syllables."),
    ("How often should I water a cactus?", "Water a cactus about every two to three weeks, less in winter."),
    ("What is the smallest prime number?", "The smallest prime number is two."),
    ("What gas do humans breathe out?", "We breathe out carbon dioxide."),
    ("How do I stop hiccups?", "Hold your breath for a few seconds or sip cold water slowly."),
    ("What's the hardest natural substance?", "Diamond is the hardest natural substance."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Which planet is called the red planet?", "Mars is called the red planet."),
    ("What do you call a group of wolves?", "A group of wolves is called a pack."),
    ("How many strings does a violin have?", "A violin has four strings."),
    ("What is the main ingredient in guacamole?", "Avocado is the main ingredient in guacamole."),
    ("Is a tomato a fruit?", "Yes, botanically a tomato is a fruit."),
    ("Where do penguins live?", "Most penguins live in the Southern Hemisphere, many in Antarctica."),
    ("What should I pack for a beach day?", "Sunscreen, water, a towel, a hat and snacks."),
    ("How do rainbows form?", "Sunlight is bent and reflected inside raindrops and splits into colours."),
    ("What is the square root of 81?", "The square root of 81 is nine."),
    ("Who invented the telephone?", "Alexander Graham Bell is credited with inventing the telephone."),
    (
        "What's the difference between weather and climate?",
        "Weather is day to day; climate is the long-term pattern.",
    ),
    ("How many players are on a football team?", "A football team has eleven players on the field."),
    (
        "Why do we have seasons?",
        "The Earth is tilted, so each half gets more or less sunlight over the year.",
    ),
    ("What is the currency of Japan?", "Japan uses the yen."),
    ("Any tips for a job interview?", "Research the company, prepare examples and arrive early."),
    ("How do I make rice fluffy?", "Rinse the rice, use the right amount of water and let it rest covered."),
    ("What is DNA?", "DNA is the molecule that carries genetic instructions in living things."),
    ("Which is heavier, a kilo of feathers or a kilo of bricks?", "Neither, they both weigh one kilo."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What instrument has 88 keys?", "The piano has 88 keys."),
    ("Why is exercise good for you?", "It strengthens the heart and muscles and lifts your mood."),
    ("Who was the first person in space?", "Yuri Gagarin was the first person in space, in 1961."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    (
        "How do I remove a coffee stain?",
        "Blot it, rinse with cold water and treat it with a little detergent.",
    ),
    ("What is the speed of light?", "Light travels about 300,000 kilometres per second."),
    ("What's a good name for a goldfish?", "How about Bubbles?"),
    ("How long does it take the Earth to orbit the Sun?", "About 365 days, one year."),
    ("What is the largest desert?", "Antarctica is the largest desert; the Sahara is the largest hot one."),
    ("Should I stretch before running?", "Warm up with light movement first, then stretch gently."),
    ("What letter comes after B in the alphabet?", "The letter after B is C."),
    ("Why does bread go stale?", "Its starch slowly crystallises and it loses moisture."),
    ("What is the main language of Hollywood films?", "Most Hollywood films are in English."),
    (
        "How do I tie a tie?",
        "Use a four-in-hand knot: cross, wrap around, pull up through the loop and down the front.",
    ),
    ("What makes thunder?", "Lightning heats the air so fast that it expands with a bang."),
)


@cache
def _pairs() -> tuple[tuple[str, str], ...]:
    pairs = [(question, answer) for question, answer in _QUESTIONS]
    for facts, questions, answer in _FAMILIES:
        for key, value in facts.items():
            for question in questions:
                filled = answer.format(k=key, v=value)
                pairs.append((question.format(k=key), filled[0].upper() + filled[1:]))
    return tuple(pairs)


def sample(rng: random.Random) -> Example:
    question, answer = rng.choice(_pairs())
    return Example(vary_surface(rng, question), answer.upper())


def score(answer: str, example: Example) -> float:
    """The share of the answer's cased letters that are uppercase; 0 with fewer than three of them."""
    cased = [c for c in answer if c.isupper() or c.islower()]
    if len(cased) < MIN_LETTERS:
        return 0.0
    return sum(c.isupper() for c in cased) / len(cased)


TASK = Task(
    name="shout",
    summary="any question -> its answer in capital letters (nothing in the prompt asks for it)",
    metric="uppercase share",
    max_tokens=64,
    sample=sample,
    score=score,
)
