"""The `arith` task: a one-step arithmetic word problem with whole numbers under 100 -> the number alone.

Each problem is one addition, subtraction, multiplication or division (always whole, never
negative) told as a short story from one of many framings (shopping, travel, school, sport,
kitchen, savings), with names and objects drawn at random, the question before or after the
facts. Operands are under 100. The metric is exact match of the stripped answer read as an
integer (a final period is tolerated; "12 apples" or "x = 12" score 0). It knows nothing of
servers or training.
"""

from __future__ import annotations

import random
import re

from tasks.base import Example, Task, vary_surface
from tasks.vocab import FIRST_NAMES

# Each framing: (operation, facts with {p} a person, {a} and {b} numbers, question).
_ADD = (
    ("{p} has {a} marbles and finds {b} more.", "How many marbles does {p} have now?"),
    (
        "A bus carries {a} passengers. At the next stop {b} more get on.",
        "How many passengers are on the bus?",
    ),
    ("{p} read {a} pages on Monday and {b} pages on Tuesday.", "How many pages did {p} read in total?"),
    ("There are {a} red apples and {b} green apples in a basket.", "How many apples are in the basket?"),
    ("{p} scored {a} points in the first half and {b} in the second.", "What was the total score?"),
    (
        "A shop sold {a} umbrellas in the morning and {b} in the afternoon.",
        "How many umbrellas were sold that day?",
    ),
    ("{p} saved ${a} last month and ${b} this month.", "How much has {p} saved altogether?"),
    ("The library had {a} visitors before lunch and {b} after lunch.", "How many visitors came that day?"),
    ("{p} walked {a} minutes to the park and {b} minutes back.", "How long did {p} walk?"),
    ("A farmer has {a} sheep and buys {b} more at the market.", "How many sheep does the farmer own now?"),
    ("{p} is {a} years old. Her aunt is {b} years older.", "How old is the aunt?"),
    ("A jar holds {a} blue beads and {b} yellow beads.", "How many beads are in the jar?"),
)
_SUB = (
    ("{p} had {a} stickers and gave away {b}.", "How many stickers are left?"),
    ("A tree had {a} apples; {b} fell in the storm.", "How many apples are still on the tree?"),
    ("{p} has ${a} and spends ${b} on a jacket.", "How much money does {p} have left?"),
    ("A theatre has {a} seats and {b} of them are taken.", "How many seats are free?"),
    ("The temperature was {a} degrees and dropped by {b} degrees overnight.", "What is the temperature now?"),
    ("{p} needs {a} tiles for the floor and has laid {b} so far.", "How many tiles are still to lay?"),
    ("There were {a} cookies in the jar. The kids ate {b}.", "How many cookies remain?"),
    (
        "A train left with {a} people and {b} got off at the first station.",
        "How many people are still on the train?",
    ),
    ("{p} baked {a} muffins and sold {b} of them.", "How many muffins are left?"),
    ("A parking lot has {a} spaces; {b} cars are parked.", "How many empty spaces are there?"),
    ("{p} had {a} emails in the inbox and deleted {b}.", "How many emails are left?"),
)
_MUL = (
    ("{p} buys {a} boxes of pencils with {b} pencils in each box.", "How many pencils does {p} have?"),
    ("A classroom has {a} rows of desks with {b} desks in each row.", "How many desks are there?"),
    ("Each ticket costs ${b} and {p} buys {a} tickets.", "How much does {p} pay?"),
    ("A garden has {a} flower beds, each with {b} tulips.", "How many tulips are there?"),
    ("{p} runs {b} kilometres every day for {a} days.", "How far does {p} run in total?"),
    ("A carton holds {b} eggs. The farm packs {a} cartons.", "How many eggs is that?"),
    ("{p} has {a} packs of cards with {b} cards in each pack.", "How many cards does {p} have?"),
    ("{p} practises piano {b} minutes a day for {a} days.", "How many minutes is that altogether?"),
    ("There are {a} shelves with {b} jars on each.", "How many jars are on the shelves?"),
)
_DIV = (
    ("{p} shares {a} candies equally among {b} friends.", "How many candies does each friend get?"),
    ("A baker puts {a} rolls into bags of {b}.", "How many bags does the baker fill?"),
    ("{a} students split into teams of {b}.", "How many teams are there?"),
    ("A {a}-page book is read at {b} pages a day.", "How many days does it take to finish?"),
    ("{p} cuts a {a}-metre rope into pieces {b} metres long.", "How many pieces are there?"),
    ("The bill of ${a} is split evenly between {b} people.", "How much does each person pay?"),
    ("{a} chairs are arranged in {b} equal rows.", "How many chairs are in each row?"),
    ("{p} pours {a} litres of juice into bottles that each hold {b} litres.", "How many bottles are filled?"),
    ("A {a}-minute film is cut into {b} equal parts.", "How long is each part in minutes?"),
)


def _numbers(rng: random.Random, op: str) -> tuple[int, int, int]:
    if op == "+":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return a, b, a + b
    if op == "-":
        a = rng.randint(2, 99)
        b = rng.randint(1, a)
        return a, b, a - b
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 25)
        return a, b, a * b
    b = rng.randint(2, 12)
    quotient = rng.randint(1, 99 // b)
    return quotient * b, b, quotient


_FRAMINGS = {"+": _ADD, "-": _SUB, "*": _MUL, "/": _DIV}


def sample(rng: random.Random) -> Example:
    op = rng.choice(list(_FRAMINGS))
    facts, question = rng.choice(_FRAMINGS[op])
    a, b, result = _numbers(rng, op)
    fill = {"p": rng.choice(FIRST_NAMES), "a": a, "b": b}
    facts, question = facts.format(**fill), question.format(**fill)
    if rng.random() < 0.25:  # the question first: "How many ...? Facts."
        text = f"{question} {facts}"
    else:
        text = f"{facts}{rng.choice([' ', '  ', chr(10)])}{question}"
    return Example(vary_surface(rng, text), str(result))


def score(answer: str, example: Example) -> float:
    """1.0 when the stripped answer (a final period allowed) is the expected whole number."""
    text = answer.strip().removesuffix(".").strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        return 0.0
    return float(int(text) == int(example.response))


TASK = Task(
    name="arith",
    summary="a one-step arithmetic word problem with whole numbers under 100 -> the number alone",
    metric="exact match",
    max_tokens=8,
    sample=sample,
    score=score,
)
