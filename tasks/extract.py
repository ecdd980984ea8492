"""The `extract` task: one sentence about a person -> `{"name": ..., "age": <int>, "city": ...}`.

Sentences put the name, the age (digits, "a 34-year-old", or words) and the city in any order,
in many phrasings (introductions, news, forms, gossip). The response is one compact JSON object
with exactly those keys; the metric is exact match of the parsed object: malformed JSON, a
missing or extra key, an age written as a string or a name spelled differently score 0. It
knows nothing of servers or training.
"""

from __future__ import annotations

import json
import random

from tasks.base import Example, Task, strip_fences
from tasks.vocab import CITIES, FIRST_NAMES, LAST_NAMES

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty"}

# {n} name, {a} age as a number, {w} age however it is said, {c} city.
_TEMPLATES = (
    "{n} is {w} years old and lives in {c}.",
    "{n}, {a}, lives in {c}.",
    "{n}, {a}, from {c}.",
    "Meet {n}: {w} years old, based in {c}.",
    "At {w}, {n} moved to {c}.",
    "{c} is home to {n}, who is {w}.",
    "{n} ({a}) has lived in {c} for years.",
    "Born {w} years ago, {n} now calls {c} home.",
    "{n} turned {w} last week and threw a party in {c}.",
    "A {a}-year-old named {n} was spotted in {c}.",
    "Our new neighbour {n} just arrived from {c}; she says she is {w}.",
    "Our new neighbour {n} just arrived from {c}; he says he is {w}.",
    "{n} is a {a}-year-old teacher in {c}.",
    "In {c}, {a}-year-old {n} opened a bakery.",
    "Name: {n}. Age: {a}. City: {c}.",
    "{n} | {a} | {c}",
    "I met {n} in {c}; {n_first} is {w}.",
    "The {a}-year-old {n} works as a nurse in {c}.",
    "{n}, a {c} resident aged {a}, won the marathon.",
    "Hi, I'm {n}, I'm {w} and I live in {c}.",
    "{n} celebrated turning {w} in {c} yesterday.",
    "Living in {c} at age {a}, {n} runs a small shop.",
    "{n} just turned {w} and lives in {c} with two cats.",
    "Police say {n}, {a}, of {c}, found the missing dog.",
    "My cousin {n} is {w} now and still lives in {c}.",
    "Age {a}, {n} commutes every day in {c}.",
    "{n} — {a} years old — moved to {c} last spring.",
    "After years abroad, {n}, now {w}, settled in {c}.",
    "{n} from {c} is {w} years old.",
    "Registered participant: {n}, {a} years, {c}.",
)


def age_in_words(age: int) -> str:
    tens, ones = divmod(age, 10)
    if age < 20 or tens not in _TENS:
        return str(age)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def answer_json(name: str, age: int, city: str) -> str:
    return json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)


def sample(rng: random.Random) -> Example:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    name = f"{first} {last}"
    age = rng.randint(18, 89)
    city = rng.choice(CITIES)
    said = age_in_words(age) if rng.random() < 0.2 else str(age)
    sentence = rng.choice(_TEMPLATES).format(n=name, n_first=first, a=age, w=said, c=city)
    if rng.random() < 0.2 and sentence.endswith("."):  # names keep their case: they are copied out
        sentence = sentence[:-1]
    return Example(sentence, answer_json(name, age, city))


def score(answer: str, example: Example) -> float:
    """1.0 when the answer parses to exactly the expected object (keys, types and values)."""
    try:
        got = json.loads(strip_fences(answer))
    except ValueError:
        return 0.0
    return float(isinstance(got, dict) and got == json.loads(example.response))


TASK = Task(
    name="extract",
    summary='one sentence about a person -> {"name": ..., "age": ..., "city": ...}',
    metric="exact match",
    max_tokens=48,
    sample=sample,
    score=score,
)
