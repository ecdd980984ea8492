"""The `sentiment` task: a product review -> `positive` or `negative`; metric: accuracy.

Reviews are assembled from an opening, one to four remarks about aspects of a product and an
optional closing, drawn from banks of positive and negative phrases, with mixed vocabulary: a
positive review may grumble about one detail and a negative one may praise one, so that the
label follows the whole review, not a single word. The metric accepts the label in any case,
with surrounding whitespace or a final mark. It knows nothing of servers or training.
"""

from __future__ import annotations

import random

from tasks.base import Example, Task, pick, vary_surface

PRODUCTS = (
    "blender",
    "vacuum cleaner",
    "pair of running shoes",
    "laptop bag",
    "coffee maker",
    "desk lamp",
    "electric toothbrush",
    "phone case",
    "wireless earbuds",
    "yoga mat",
    "frying pan",
    "backpack",
    "office chair",
    "water bottle",
    "air fryer",
    "mechanical keyboard",
    "rain jacket",
    "tent",
    "bike helmet",
    "smartwatch",
    "kettle",
    "mattress",
    "winter coat",
    "board game",
    "novel",
    "baby stroller",
    "dog bed",
    "garden hose",
    "drill",
    "monitor",
    "webcam",
    "hair dryer",
    "sofa cover",
    "set of knives",
    "toaster",
    "suitcase",
    "printer",
    "bluetooth speaker",
    "microwave",
    "pillow",
    "scarf",
    "pair of jeans",
    "e-reader",
    "router",
    "fan",
    "cookbook",
    "lunch box",
    "standing desk",
    "pair of sunglasses",
    "car phone mount",
    "electric scooter",
    "tablet",
)

_OPEN = {
    "positive": [
        "I love this {p}.",
        "This {p} is fantastic.",
        "Really happy with my new {p}.",
        "Best {p} I have ever owned.",
        "Bought this {p} a month ago and no regrets.",
        "Great {p}, exactly as described.",
        "Wow, what a {p}!",
        "My wife adores this {p}.",
        "Five stars for this {p}.",
        "Pleasantly surprised by this {p}.",
        "Ordered the {p} on a whim and it turned out to be a gem.",
        "Solid {p}.",
    ],
    "negative": [
        "I regret buying this {p}.",
        "This {p} is a joke.",
        "Very disappointed with this {p}.",
        "Worst {p} I have ever owned.",
        "Bought this {p} a month ago and it is already junk.",
        "Terrible {p}, nothing like the pictures.",
        "Ugh, what a {p}.",
        "One star, and that is generous, for this {p}.",
        "Do not buy this {p}.",
        "Sadly this {p} let me down.",
        "The {p} arrived and went straight back.",
        "Cheap {p} in every bad sense.",
    ],
}
_REMARKS = {
    "positive": [
        "It works perfectly.",
        "Build quality is excellent.",
        "Setup took two minutes.",
        "It feels sturdy and well made.",
        "Worth every penny.",
        "Shipping was quick.",
        "The battery lasts for days.",
        "It is quiet and efficient.",
        "Looks even better in person.",
        "Customer service was friendly and helpful.",
        "Comfortable enough to use all day.",
        "My kids use it every day and it still looks new.",
        "It does exactly what it promises.",
        "Cleaning it is a breeze.",
        "The price was fair for the quality.",
        "It has held up through a lot of abuse.",
        "Instructions were clear.",
        "Packaging was tidy and nothing was missing.",
    ],
    "negative": [
        "It stopped working after a week.",
        "The plastic feels flimsy.",
        "Setup was a nightmare.",
        "It broke the second time I used it.",
        "A complete waste of money.",
        "Shipping took forever.",
        "The battery dies within hours.",
        "It is loud and rattles.",
        "Looks cheap in person.",
        "Customer service never answered my emails.",
        "Uncomfortable after ten minutes.",
        "Parts were missing from the box.",
        "It does not do what the listing claims.",
        "Impossible to clean properly.",
        "Way overpriced for what you get.",
        "The stitching came apart almost immediately.",
        "The instructions made no sense.",
        "It smelled of chemicals for days.",
    ],
}
# One remark against the grain, so that a single word does not decide the label.
_BUT = {
    "positive": [
        "The box was a bit dented, but who cares.",
        "It is slightly heavier than I expected, though.",
        "Delivery was late, but the product itself is great.",
        "Not cheap, but worth it.",
        "The color is a little off from the photo.",
    ],
    "negative": [
        "It looks nice, I will give it that.",
        "Delivery was fast, at least.",
        "The price was low, but now I see why.",
        "The design is pretty, shame about the rest.",
        "Packaging was nice.",
    ],
}
_CLOSE = {
    "positive": [
        "Highly recommend!",
        "Would buy again.",
        "I'm ordering a second one for my sister.",
        "10/10.",
        "Couldn't be happier.",
        "Recommended to all my friends.",
        "Love it!",
    ],
    "negative": [
        "Avoid.",
        "Returning it.",
        "Save your money.",
        "Never again.",
        "I want a refund.",
        "Zero stars if I could.",
        "Stay away from this one.",
    ],
}


def sample(rng: random.Random) -> Example:
    label = rng.choice(("positive", "negative"))
    product = rng.choice(PRODUCTS)
    parts = [rng.choice(_OPEN[label]).format(p=product)]
    parts += rng.sample(_REMARKS[label], rng.randint(0, 3))
    if rng.random() < 0.3:
        parts.insert(rng.randint(1, len(parts)), rng.choice(_BUT[label]))
    if rng.random() < 0.6 or len(parts) == 1:
        parts.append(rng.choice(_CLOSE[label]))
    if len(parts) > 2 and rng.random() < 0.3:  # the opening need not come first
        parts[0], parts[1] = parts[1], parts[0]
    review = pick(rng, [" ".join(parts), " ".join(parts), "  ".join(parts), "\n".join(parts)])
    return Example(vary_surface(rng, review), label)


def score(answer: str, example: Example) -> float:
    """1.0 when the answer is the example's label, ignoring case, whitespace and final marks."""
    return float(answer.strip().strip(".!\"'`").strip().lower() == example.response)


TASK = Task(
    name="sentiment",
    summary="a product review -> positive or negative",
    metric="accuracy",
    max_tokens=4,
    sample=sample,
    score=score,
)
