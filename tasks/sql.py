"""The `sql` task: a question about one fixed table -> one SQLite query; metric: execution accuracy.

The table is `employees(id INTEGER, name TEXT, department TEXT, salary INTEGER, hire_year INTEGER)`,
48 rows built deterministically in memory (`employees_db`); names are unique and so are salaries,
so that "the top three earners" has one answer. A query scores 1 when its result set equals the
reference query's: as a multiset of rows, or as a list when the reference has ORDER BY; column
names do not count and numbers compare to 4 decimals. A model's query runs on a connection that
can only read (`query_only`, an authorizer that allows reading and nothing else), one statement,
a SELECT or WITH, stopped after a budget of VM steps or a second: it cannot hang, write, attach
or change a setting. It knows nothing of servers or training.
"""

from __future__ import annotations

import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from functools import cache

from tasks.base import Example, Task, pick, strip_fences, vary_surface
from tasks.vocab import FIRST_NAMES, LAST_NAMES

SCHEMA = (
    "CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT NOT NULL, department TEXT NOT NULL, "
    "salary INTEGER NOT NULL, hire_year INTEGER NOT NULL)"
)
DEPARTMENTS = ("Engineering", "Sales", "Marketing", "Finance", "HR", "Support", "Legal", "Operations")
MAX_STEPS = 2_000_000  # SQLite VM instructions a query may take (a full scan of 48 rows takes ~1,000)
MAX_SECONDS = 1.0
_STEPS_PER_CHECK = 1_000

Row = tuple[object, ...]


@cache
def employees_rows() -> tuple[tuple[int, str, str, int, int], ...]:
    """The table's 48 rows (id, name, department, salary, hire_year), the same on every call."""
    rng = random.Random(20240610)
    names: list[str] = []
    while len(names) < 48:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if name not in names and "'" not in name:
            names.append(name)
    salaries = rng.sample(range(38_000, 182_000, 500), 48)
    return tuple(
        (
            i + 1,
            name,
            DEPARTMENTS[i % len(DEPARTMENTS)] if i < 16 else rng.choice(DEPARTMENTS),
            salaries[i],
            rng.randint(2008, 2024),
        )
        for i, name in enumerate(names)
    )


def employees_db() -> sqlite3.Connection:
    """A new in-memory database holding the table, already read-only (see `run_query`)."""
    conn = sqlite3.connect(":memory:")
    conn.execute(SCHEMA)
    conn.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?)", employees_rows())
    conn.commit()
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_read_only_authorizer)
    return conn


_ALLOWED_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}


def _read_only_authorizer(action: int, *args: object) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


class QueryRefused(ValueError):
    """A model's output that is not one read-only SELECT."""


def clean_query(answer: str) -> str:
    """The query in an answer: no code fences, surrounding whitespace or trailing semicolons."""
    query = strip_fences(answer).rstrip().rstrip(";").strip()
    if not re.match(r"(select|with)\b", query, flags=re.IGNORECASE):
        raise QueryRefused(f"not a SELECT: {query[:40]!r}")
    return query


def run_query(conn: sqlite3.Connection, answer: str) -> list[Row]:
    """The rows one read-only query returns; raises QueryRefused or sqlite3.Error otherwise."""
    query = clean_query(answer)
    deadline = time.monotonic() + MAX_SECONDS
    checks = 0

    def over_budget() -> int:
        nonlocal checks
        checks += 1
        return int(checks * _STEPS_PER_CHECK > MAX_STEPS or time.monotonic() > deadline)

    conn.set_progress_handler(over_budget, _STEPS_PER_CHECK)
    try:
        return conn.execute(query).fetchmany(10_000)  # raises on a second statement, a write, a PRAGMA
    finally:
        conn.set_progress_handler(None, 0)


def _canonical(rows: list[Row]) -> list[Row]:
    def value(v: object) -> object:
        if isinstance(v, float):
            v = round(v, 4)
            return int(v) if v.is_integer() else v
        return v

    return [tuple(value(v) for v in row) for row in rows]


def score(answer: str, example: Example) -> float:
    """1.0 when the answer's result set equals the reference query's (example.response), else 0.0."""
    conn = employees_db()
    try:
        want = _canonical(run_query(conn, example.response))
        try:
            got = _canonical(run_query(conn, answer))
        except (QueryRefused, sqlite3.Error):
            return 0.0
    finally:
        conn.close()
    if re.search(r"\border\s+by\b", example.response, flags=re.IGNORECASE):
        return float(got == want)
    return float(Counter(got) == Counter(want))


# -- the generator -------------------------------------------------------------------------
# Each pattern draws its slots and returns (question, query). Questions vary in phrasing, in the
# words for departments, money and years, and in surface (case, final mark).


def _dept_phrase(rng: random.Random, dept: str) -> str:
    lower = dept if dept == "HR" else dept.lower()
    return pick(rng, [dept, f"the {dept} department", f"the {lower} team", lower, f"{lower} dept"])


def _money(rng: random.Random, amount: int) -> str:
    return pick(
        rng, [str(amount), f"{amount:,}", f"${amount:,}", f"{amount // 1000}k", f"${amount // 1000}k"]
    )


def _name(rng: random.Random) -> str:
    return rng.choice(employees_rows())[1]


def _listing(rng: random.Random) -> tuple[str, str]:
    dept = rng.choice(DEPARTMENTS)
    d = _dept_phrase(rng, dept)
    question = pick(
        rng,
        [
            f"Who works in {d}?",
            f"List everyone in {d}.",
            f"Which employees are in {d}?",
            f"show me the people in {d}",
            f"Names of all staff in {d}?",
            f"Give me the names of the employees who belong to {d}.",
            f"Who do we have in {d}?",
            f"Can you list our people in {d}?",
        ],
    )
    return question, f"SELECT name FROM employees WHERE department = '{dept}'"


def _count_dept(rng: random.Random) -> tuple[str, str]:
    dept = rng.choice(DEPARTMENTS)
    d = _dept_phrase(rng, dept)
    question = pick(
        rng,
        [
            f"How many people work in {d}?",
            f"Count the employees in {d}.",
            f"what's the headcount of {d}?",
            f"Number of staff in {d}?",
            f"How big is {d}?",
            f"How many employees does {d} have?",
            f"How many people do we have in {d}?",
            f"I'd like the headcount for {d}.",
        ],
    )
    return question, f"SELECT COUNT(*) FROM employees WHERE department = '{dept}'"


def _count_all(rng: random.Random) -> tuple[str, str]:
    question = pick(
        rng,
        [
            "How many employees are there?",
            "What is the total number of employees?",
            "How many people does the company employ?",
            "total headcount?",
            "Count all the staff.",
            "How many people do we employ?",
            "How many of us are there in total?",
        ],
    )
    return question, "SELECT COUNT(*) FROM employees"


def _aggregate_dept(rng: random.Random) -> tuple[str, str]:
    dept = rng.choice(DEPARTMENTS)
    d = _dept_phrase(rng, dept)
    fn, words = rng.choice(
        [
            ("AVG", ["average", "mean"]),
            ("MAX", ["highest", "maximum", "top"]),
            ("MIN", ["lowest", "minimum", "smallest"]),
            ("SUM", ["total", "combined"]),
        ]
    )
    w = rng.choice(words)
    question = pick(
        rng,
        [
            f"What is the {w} salary in {d}?",
            f"{w.capitalize()} salary for {d}?",
            f"Tell me the {w} pay in {d}.",
            f"What's the {w} salary of employees in {d}?",
            f"In {d}, what is the {w} salary?",
            f"What do we pay in {d} on the {w}?"
            if w in ("average", "mean")
            else f"What's our {w} salary in {d}?",
        ],
    )
    return question, f"SELECT {fn}(salary) FROM employees WHERE department = '{dept}'"


def _aggregate_all(rng: random.Random) -> tuple[str, str]:
    fn, column, words = rng.choice(
        [
            ("AVG", "salary", ["average salary", "mean salary", "average pay"]),
            ("MAX", "salary", ["highest salary", "largest salary", "top salary"]),
            ("MIN", "salary", ["lowest salary", "smallest salary", "minimum pay"]),
            ("SUM", "salary", ["total payroll", "sum of all salaries", "total salary bill"]),
            ("MIN", "hire_year", ["earliest hire year", "first year anyone was hired"]),
            ("MAX", "hire_year", ["most recent hire year", "latest hiring year"]),
            ("AVG", "hire_year", ["average hire year"]),
        ]
    )
    w = rng.choice(words)
    question = pick(
        rng,
        [
            f"What is the {w}?",
            f"What's the {w} across the company?",
            f"Find the {w} of all employees.",
            f"{w} overall?",
        ],
    )
    return question, f"SELECT {fn}({column}) FROM employees"


def _salary_filter(rng: random.Random) -> tuple[str, str]:
    amount = rng.randrange(40_000, 175_000, 5_000)
    above = rng.random() < 0.5
    m = _money(rng, amount)
    if above:
        question = pick(
            rng,
            [
                f"Who earns more than {m}?",
                f"Which employees make over {m}?",
                f"list employees with a salary above {m}",
                f"Anyone paid more than {m}?",
                f"Which of our people make more than {m}?",
                f"Names of people earning over {m} a year.",
            ],
        )
        return question, f"SELECT name FROM employees WHERE salary > {amount}"
    question = pick(
        rng,
        [
            f"Who earns less than {m}?",
            f"Which employees make under {m}?",
            f"list employees with a salary below {m}",
            f"Who is paid less than {m}?",
            f"Do we pay anyone under {m}? Who?",
        ],
    )
    return question, f"SELECT name FROM employees WHERE salary < {amount}"


def _year_filter(rng: random.Random) -> tuple[str, str]:
    year = rng.randint(2009, 2023)
    op, words = rng.choice([(">", ["after", "later than"]), ("<", ["before", "earlier than"]), ("=", ["in"])])
    w = rng.choice(words)
    question = pick(
        rng,
        [
            f"Who was hired {w} {year}?",
            f"Which employees joined {w} {year}?",
            f"List the people who started {w} {year}.",
            f"employees hired {w} {year}?",
            f"Who did we hire {w} {year}?",
        ],
    )
    return question, f"SELECT name FROM employees WHERE hire_year {op} {year}"


def _count_year(rng: random.Random) -> tuple[str, str]:
    year = rng.randint(2008, 2024)
    question = pick(
        rng,
        [
            f"How many people were hired in {year}?",
            f"How many employees joined in {year}?",
            f"Number of hires in {year}?",
            f"In {year}, how many people started?",
        ],
    )
    return question, f"SELECT COUNT(*) FROM employees WHERE hire_year = {year}"


def _year_between(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(2008, 2020)
    end = rng.randint(start + 1, 2024)
    question = pick(
        rng,
        [
            f"Who was hired between {start} and {end}?",
            f"List employees who joined from {start} to {end}.",
            f"Which staff started between {start} and {end}, inclusive?",
        ],
    )
    return question, f"SELECT name FROM employees WHERE hire_year BETWEEN {start} AND {end}"


def _salary_between(rng: random.Random) -> tuple[str, str]:
    low = rng.randrange(40_000, 150_000, 10_000)
    high = low + rng.randrange(10_000, 40_000, 5_000)
    question = pick(
        rng,
        [
            f"Who earns between {_money(rng, low)} and {_money(rng, high)}?",
            f"Which employees have salaries from {_money(rng, low)} to {_money(rng, high)}?",
            f"People paid between {_money(rng, low)} and {_money(rng, high)}?",
        ],
    )
    return question, f"SELECT name FROM employees WHERE salary BETWEEN {low} AND {high}"


def _name_like(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice(sorted({row[1][0] for row in employees_rows()}))
    if rng.random() < 0.6:
        question = pick(
            rng,
            [
                f"Which employees have names starting with {letter}?",
                f"Who has a name that begins with the letter {letter}?",
                f"List the staff whose names start with '{letter}'.",
            ],
        )
        return question, f"SELECT name FROM employees WHERE name LIKE '{letter}%'"
    last = rng.choice(LAST_NAMES)
    question = pick(
        rng,
        [
            f"Is anyone named {last} working here?",
            f"Find employees with the surname {last}.",
            f"Who has the last name {last}?",
        ],
    )
    return question, f"SELECT name FROM employees WHERE name LIKE '% {last}'"


def _person_fact(rng: random.Random) -> tuple[str, str]:
    name = _name(rng)
    column, options = rng.choice(
        [
            (
                "department",
                [
                    f"Which department does {name} work in?",
                    f"What team is {name} on?",
                    f"{name}'s department?",
                ],
            ),
            ("salary", [f"How much does {name} earn?", f"What is {name}'s salary?", f"{name} salary?"]),
            (
                "hire_year",
                [
                    f"When was {name} hired?",
                    f"What year did {name} join?",
                    f"In which year did {name} start working here?",
                    f"When did we hire {name}?",
                ],
            ),
        ]
    )
    return rng.choice(options), f"SELECT {column} FROM employees WHERE name = '{name}'"


def _top_n(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 5)
    high = rng.random() < 0.6
    if n == 1:
        question = (
            pick(
                rng,
                [
                    "Who is the highest paid employee?",
                    "Who earns the most?",
                    "which employee has the biggest salary?",
                    "Who's our best-paid person?",
                ],
            )
            if high
            else pick(
                rng,
                [
                    "Who is the lowest paid employee?",
                    "Who earns the least?",
                    "Which employee has the smallest salary?",
                ],
            )
        )
        return question, f"SELECT name FROM employees ORDER BY salary {'DESC' if high else 'ASC'} LIMIT 1"
    words = ["top", "highest-paid", "best-paid"] if high else ["lowest-paid", "least well paid"]
    question = pick(
        rng,
        [
            f"Show the {n} {rng.choice(words)} employees and their salaries.",
            f"List the {rng.choice(words)} {n} people with their pay.",
            f"Who are the {n} {rng.choice(words)} employees? Include salaries.",
            f"I want our {n} {rng.choice(words)} people and what they make.",
        ],
    )
    order = "DESC" if high else "ASC"
    return question, f"SELECT name, salary FROM employees ORDER BY salary {order} LIMIT {n}"


def _group_by(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        question = pick(
            rng,
            [
                "How many employees are in each department?",
                "Headcount per department?",
                "Count the staff by department.",
                "How many people do we have on each team?",
                "Show the number of people in every team.",
            ],
        )
        return question, "SELECT department, COUNT(*) FROM employees GROUP BY department"
    if kind == 1:
        question = pick(
            rng,
            [
                "What is the average salary in each department?",
                "Average pay by department?",
                "Show mean salary per department.",
            ],
        )
        return question, "SELECT department, AVG(salary) FROM employees GROUP BY department"
    if kind == 2:
        question = pick(
            rng, ["How many people were hired each year?", "Hires per year?", "Count employees by hire year."]
        )
        return question, "SELECT hire_year, COUNT(*) FROM employees GROUP BY hire_year"
    k = rng.randint(3, 7)
    question = pick(
        rng,
        [
            f"Which departments have more than {k} employees?",
            f"List the teams with over {k} people.",
            f"Departments with a headcount above {k}?",
        ],
    )
    return question, f"SELECT department FROM employees GROUP BY department HAVING COUNT(*) > {k}"


def _combined(rng: random.Random) -> tuple[str, str]:
    dept = rng.choice(DEPARTMENTS)
    d = _dept_phrase(rng, dept)
    kind = rng.randrange(4)
    if kind == 0:
        amount = rng.randrange(50_000, 160_000, 5_000)
        question = pick(
            rng,
            [
                f"Who in {d} earns more than {_money(rng, amount)}?",
                f"List employees in {d} with a salary over {_money(rng, amount)}.",
                f"Which {d} staff make above {_money(rng, amount)}?",
            ],
        )
        return question, f"SELECT name FROM employees WHERE department = '{dept}' AND salary > {amount}"
    if kind == 1:
        year = rng.randint(2010, 2022)
        question = pick(
            rng,
            [
                f"How many people in {d} were hired after {year}?",
                f"Count the {d} employees who joined after {year}.",
                f"Number of staff in {d} hired since {year + 1}?",
            ],
        )
        return question, (
            f"SELECT COUNT(*) FROM employees WHERE department = '{dept}' AND hire_year > {year}"
        )
    if kind == 2:
        question = pick(
            rng,
            [
                f"List the people in {d} in alphabetical order.",
                f"Names in {d}, sorted alphabetically?",
                f"Show {d} employees ordered by name.",
            ],
        )
        return question, f"SELECT name FROM employees WHERE department = '{dept}' ORDER BY name"
    question = pick(
        rng, [f"Who is the highest paid person in {d}?", f"Who earns the most in {d}?", f"Top earner in {d}?"]
    )
    return question, (f"SELECT name FROM employees WHERE department = '{dept}' ORDER BY salary DESC LIMIT 1")


def _distinct(rng: random.Random) -> tuple[str, str]:
    question = pick(
        rng,
        [
            "What departments are there?",
            "List all the departments.",
            "Which teams exist in the company?",
            "Name every department.",
        ],
    )
    return question, "SELECT DISTINCT department FROM employees"


_PATTERNS: tuple[tuple[Callable[[random.Random], tuple[str, str]], int], ...] = (
    (_listing, 3),
    (_count_dept, 3),
    (_count_all, 1),
    (_aggregate_dept, 4),
    (_aggregate_all, 2),
    (_salary_filter, 3),
    (_year_filter, 3),
    (_count_year, 2),
    (_year_between, 2),
    (_salary_between, 2),
    (_name_like, 2),
    (_person_fact, 4),
    (_top_n, 3),
    (_group_by, 3),
    (_combined, 5),
    (_distinct, 1),
)


# Questions as colleagues send them: a greeting, a reason or a request around the bare question,
# in the first person. Without these every generated question was terse and impersonal, and the
# router (which learns from an adapter's prompts) took chatty questions for product reviews.
_OPENINGS = (
    "Quick question: ",
    "Hi! ",
    "Hey, ",
    "Hello there. ",
    "For my monthly report: ",
    "My manager is asking me this. ",
    "I'm putting together the budget review. ",
    "Need this before the meeting: ",
    "Can you check something for me? ",
    "I'm new here and trying to learn the org. ",
    "We're planning next year's hiring. ",
    "Sorry to bother you. ",
    "One more for you: ",
    "I have to answer HQ by noon. ",
)
_CLOSINGS = (
    " Thanks!",
    " Thank you.",
    " Please.",
    " Cheers.",
    " It's for a slide I'm making.",
    " Much appreciated.",
    " Thanks in advance.",
    " Need it today if possible.",
)
VOICED = 0.35  # share of questions wrapped in an opening and/or a closing


def _voiced(rng: random.Random, question: str) -> str:
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(_OPENINGS) + question
    if roll < 0.75:
        return question + rng.choice(_CLOSINGS)
    return rng.choice(_OPENINGS) + question + rng.choice(_CLOSINGS)


def sample(rng: random.Random) -> Example:
    patterns, weights = zip(*_PATTERNS, strict=True)
    question, query = rng.choices(patterns, weights)[0](rng)
    if rng.random() < VOICED:
        question = _voiced(rng, question)
    return Example(vary_surface(rng, question), query)


TASK = Task(
    name="sql",
    summary="a question about employees(id, name, department, salary, hire_year) -> one SQLite query",
    metric="execution accuracy",
    max_tokens=96,
    sample=sample,
    score=score,
)
