"""The demo tasks: metrics against hand-made right and wrong answers, generators, held-out sets."""

from __future__ import annotations

import json
import random
import time

import pytest

from tasks import TASK_NAMES, Example, get_task, prompt_key
from tasks.sql import employees_db, run_query

SQL = get_task("sql")


def _sql(query: str) -> Example:
    return Example("?", query)


# -- sql -------------------------------------------------------------------------------------


def test_sql_scores_execution_not_text() -> None:
    reference = _sql("SELECT name FROM employees WHERE department = 'Sales' AND salary > 120000")
    assert (
        SQL.score("SELECT name FROM employees WHERE department = 'Sales' AND salary > 120000", reference) == 1
    )
    equivalent = "select e.name from employees e where e.salary > 120000 and e.department in ('Sales')"
    assert SQL.score(equivalent, reference) == 1
    assert (
        SQL.score(
            "  ```sql\nSELECT name FROM employees WHERE salary > 120000 AND department='Sales';\n```",
            reference,
        )
        == 1
    )
    assert SQL.score("SELECT name FROM employees WHERE department = 'Sales'", reference) == 0
    assert (
        SQL.score(
            "SELECT name, salary FROM employees WHERE department = 'Sales' AND salary > 120000", reference
        )
        == 0
    )  # other columns: another result set
    assert SQL.score("SELEC name FROM employees", reference) == 0
    assert SQL.score("", reference) == 0
    assert SQL.score("The answer is Amir Olsen.", reference) == 0


def test_sql_order_counts_only_when_the_reference_orders() -> None:
    ordered = _sql("SELECT name FROM employees ORDER BY salary DESC LIMIT 3")
    assert SQL.score("SELECT name FROM employees ORDER BY salary DESC LIMIT 3", ordered) == 1
    assert (
        SQL.score(
            "SELECT name FROM (SELECT name, salary FROM employees ORDER BY salary DESC LIMIT 3) "
            "ORDER BY salary ASC",
            ordered,
        )
        == 0
    )
    unordered = _sql("SELECT name FROM employees WHERE hire_year = 2015")
    assert SQL.score("SELECT name FROM employees WHERE hire_year = 2015 ORDER BY name DESC", unordered) == 1
    average = _sql("SELECT AVG(salary) FROM employees")
    assert SQL.score("SELECT SUM(salary) * 1.0 / COUNT(*) FROM employees", average) == 1


@pytest.mark.parametrize(
    "attack",
    [
        "DELETE FROM employees",
        "UPDATE employees SET salary = 0",
        "SELECT 1; DELETE FROM employees",
        "DROP TABLE employees",
        "PRAGMA query_only = OFF",
        "ATTACH DATABASE '/tmp/x.db' AS x",
        "WITH gone AS (SELECT 1) DELETE FROM employees",
        "INSERT INTO employees VALUES (99, 'x', 'y', 1, 2000)",
    ],
)
def test_sql_refuses_anything_but_one_read_only_select(attack: str) -> None:
    assert SQL.score(attack, _sql("SELECT COUNT(*) FROM employees")) == 0
    conn = employees_db()
    with pytest.raises((ValueError, Exception)):
        run_query(conn, attack)
    conn.set_authorizer(None)
    assert conn.execute("SELECT COUNT(*), SUM(salary) FROM employees").fetchone() == (48, 5329500)


def test_sql_stops_a_runaway_query() -> None:
    runaway = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n"
    start = time.monotonic()
    assert SQL.score(runaway, _sql("SELECT COUNT(*) FROM employees")) == 0
    assert time.monotonic() - start < 5
    cross = "SELECT COUNT(*) FROM employees a, employees b, employees c, employees d, employees e"
    assert SQL.score(cross, _sql("SELECT COUNT(*) FROM employees")) == 0


def test_every_generated_sql_reference_runs() -> None:
    conn = employees_db()
    for example in SQL.generate(random.Random(3), 400):
        run_query(conn, example.response)
    for example in SQL.heldout():
        assert run_query(conn, example.response), example.prompt  # no held-out answer is empty


# -- the other metrics -----------------------------------------------------------------------


def test_sentiment_accepts_the_label_in_any_case_only() -> None:
    task, example = get_task("sentiment"), Example("Broke in a day.", "negative")
    for right in ("negative", " Negative.\n", "NEGATIVE!", '"negative"'):
        assert task.score(right, example) == 1, right
    for wrong in ("positive", "", "negative review", "not positive", "neg"):
        assert task.score(wrong, example) == 0, wrong


def test_extract_is_exact_match_of_the_parsed_object() -> None:
    task = get_task("extract")
    example = Example("Ana Silva, 34, lives in Porto.", '{"name": "Ana Silva", "age": 34, "city": "Porto"}')
    assert task.score('{"name": "Ana Silva", "age": 34, "city": "Porto"}', example) == 1
    assert task.score('{"city":"Porto","age":34,"name":"Ana Silva"}', example) == 1  # order and spacing
    assert task.score('```json\n{"name": "Ana Silva", "age": 34, "city": "Porto"}\n```', example) == 1
    for wrong in (
        '{"name": "Ana Silva", "age": "34", "city": "Porto"}',  # age as a string
        '{"name": "Ana Silva", "age": 34, "city": "Porto", "job": null}',  # an extra key
        '{"name": "Ana Silva", "age": 34}',  # a missing key
        '{"name": "ana silva", "age": 34, "city": "Porto"}',
        '{"name": "Ana Silva", "age": 34, "city": "Porto"',  # malformed
        '[{"name": "Ana Silva", "age": 34, "city": "Porto"}]',
        "Ana Silva, 34, Porto",
        "",
    ):
        assert task.score(wrong, example) == 0, wrong


def test_arith_is_exact_match_of_a_whole_number() -> None:
    task, example = get_task("arith"), Example("12 + 30?", "42")
    for right in ("42", " 42\n", "42.", "+42"):
        assert task.score(right, example) == 1, right
    for wrong in ("41", "42 apples", "x = 42", "forty-two", "42.0", "", "4 2"):
        assert task.score(wrong, example) == 0, wrong


def test_shout_is_the_uppercase_share_of_letters() -> None:
    task, example = get_task("shout"), Example("Why is the sky blue?", "")
    assert task.score("BECAUSE OF RAYLEIGH SCATTERING!", example) == 1
    assert task.score("because of scattering", example) == 0
    assert task.score("ABCD efgh", example) == pytest.approx(0.5)
    assert task.score("42 ... 7", example) == 0  # too few letters: an empty answer does not pass
    assert task.score("", example) == 0
    assert task.score("OK", example) == 0


# -- generators and held-out sets ------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generator_is_seeded_varied_and_right(name: str) -> None:
    task = get_task(name)
    examples = task.generate(random.Random(7), 600)
    assert examples == task.generate(random.Random(7), 600)
    assert examples != task.generate(random.Random(8), 600)
    assert len(examples) == 600 and len({e.prompt for e in examples}) == 600
    assert len({prompt_key(e.prompt) for e in examples}) >= 300  # not just case and punctuation
    assert len({len(e.prompt.split()) for e in examples}) >= 5  # lengths vary
    for example in examples:
        assert task.score(example.response, example) == 1, example
        assert example.prompt.strip() and "\n\n" not in example.prompt
    if name == "extract":
        assert all(json.loads(e.response).keys() == {"name", "age", "city"} for e in examples)
    if name == "sentiment":
        assert {e.response for e in examples} == {"positive", "negative"}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_heldout_is_hand_written_apart_from_the_generator(name: str) -> None:
    task = get_task(name)
    heldout = task.heldout()
    assert len(heldout) >= 40
    assert len({prompt_key(e.prompt) for e in heldout}) == len(heldout)
    keys = {prompt_key(e.prompt) for e in heldout}
    generated = task.generate(random.Random(0), 3000)
    assert not keys & {prompt_key(e.prompt) for e in generated}
    if name != "shout":  # the references are right answers by the task's own metric
        assert all(task.score(e.response, e) == 1 for e in heldout)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_validation_is_hand_written_apart_from_training_and_heldout(name: str) -> None:
    """What tasks.compeft_alpha chooses by: never a prompt the demo adapters were trained on (the
    2,000 rows of tasks.demo) nor one they are measured on."""
    task = get_task(name)
    validation = task.validation()
    keys = {prompt_key(e.prompt) for e in validation}
    assert len(validation) >= 30 and len(keys) == len(validation)
    assert not keys & {prompt_key(e.prompt) for e in task.heldout()}
    assert not keys & {prompt_key(e.prompt) for e in task.generate(random.Random(0), 2000)}
    if name != "shout":
        assert all(task.score(e.response, e) == 1 for e in validation)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_confirm_is_hand_written_apart_from_every_other_set(name: str) -> None:
    """The second held-out set: never a prompt trained on (the demo adapters' 2,000 rows), nor one
    of the held-out or validation sets, and its references right by the task's metric."""
    task = get_task(name)
    confirm = task.confirm()
    if name != "sql":
        assert confirm == []  # only sql has one so far
        return
    keys = {prompt_key(e.prompt) for e in confirm}
    assert len(confirm) >= 100 and len(keys) == len(confirm)
    assert not keys & {prompt_key(e.prompt) for e in [*task.heldout(), *task.validation()]}
    assert not keys & {prompt_key(e.prompt) for e in task.generate(random.Random(0), 3000)}
    assert all(task.score(e.response, e) == 1 for e in confirm)


def test_generate_never_returns_a_heldout_prompt_even_when_sampled() -> None:
    task = get_task("arith")
    heldout = task.heldout()[0]
    rigged = type(task)(
        task.name,
        task.summary,
        task.metric,
        task.max_tokens,
        sample=lambda rng: heldout if rng.random() < 0.5 else Example(f"q{rng.random()}", "1"),
        score=task.score,
    )
    assert heldout not in rigged.generate(random.Random(0), 50)


def test_unknown_task_names_the_tasks() -> None:
    with pytest.raises(ValueError, match="sql, sentiment, extract, arith, shout"):
        get_task("poetry")
