"""Generate the demo dataset: short free-text order messages -> one strict line of JSON.

Each example is a chat: a fixed system instruction, the customer's message, and the answer
``{"name": ..., "item": ..., "qty": ..., "city": ..., "date": ...}`` with the keys always in that order.
Values are copied from the message (name, item, city) or normalised in a simple way the model can learn:
``qty`` is an integer even when written as a word ("three" -> 3), ``date`` is MM-DD whatever way the
message wrote it ("the 4th of March" -> "03-04"), and a city the message does not mention is ``null``.

The base model follows the instruction loosely (prose, code fences, other keys, other date formats), so its
exact match is near zero; a LoRA fine-tune of a few minutes learns the format. The three splits are drawn
from one seeded stream and no message appears in two splits; test.jsonl is held out for the before/after
comparison and is never trained on (valid.jsonl gives the validation loss curve while training).

    python examples/extract/make_dataset.py            # rewrites train/valid/test.jsonl next to this file
    python examples/extract/make_dataset.py --check    # exits 1 if the committed files differ from a fresh run
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SYSTEM = ("Extract the order from the message as one line of JSON with the keys name, item, qty, city, date "
          "in that order. qty is a number, date is MM-DD, city is null when not given.")

FIRST = ["Maria", "James", "Aisha", "Tom", "Yuki", "Carlos", "Priya", "Liam", "Fatima", "Noah", "Elena", "Omar",
         "Sofia", "Lucas", "Mei", "Daniel", "Amara", "Jonas", "Chloe", "Ravi", "Hannah", "Diego", "Ingrid", "Kwame",
         "Laura", "Mateo", "Nadia", "Oscar", "Paula", "Sven", "Tara", "Victor", "Wanda", "Yusuf", "Zoe", "Akira",
         "Bianca", "Connor", "Dalia", "Emil"]
LAST = ["Lopez", "Smith", "Khan", "Becker", "Tanaka", "Silva", "Patel", "Murphy", "Haddad", "Jensen", "Rossi",
        "Nguyen", "Garcia", "Novak", "Chen", "Okafor", "Dubois", "Larsen", "Kowalski", "Mendes", "Fischer", "Ali",
        "Moreau", "Brown", "Ivanova", "Costa", "Park", "Schmidt", "Owusu", "Reyes"]
CITIES = ["Leeds", "Porto", "Lyon", "Austin", "Osaka", "Dublin", "Hamburg", "Toronto", "Valencia", "Gdansk",
          "Nairobi", "Bristol", "Denver", "Turin", "Utrecht", "Malmo", "Cork", "Seville", "Boston", "Bergen",
          "Glasgow", "Lisbon", "Munich", "Perth", "Quebec", "Leipzig", "Brno", "Oslo", "Kyoto", "Adelaide"]
COLOURS = ["blue", "red", "green", "black", "white", "yellow", "grey", "orange", "pink", "purple"]
THINGS = ["mugs", "notebooks", "candles", "t-shirts", "lamps", "cushions", "plates", "pens", "backpacks",
          "towels", "umbrellas", "scarves", "water bottles", "desk chairs", "tote bags", "picture frames",
          "phone cases", "teapots", "socks", "caps"]
SINGULAR = {"scarves": "scarf"}  # every other thing here is its plural minus the final "s"
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAY_SUFFIX = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}

WITH_CITY = [
    "Hi, this is {name}. Could I get {qty} {item} sent to {city} by {date}?",
    "{name} here - please send {qty} {item} to our {city} office on {date}.",
    "Order for {name}: {qty} x {item}, deliver {date}, {city}.",
    "Hello! I'd like to order {qty} {item}. Delivery to {city} on {date} would be great. Thanks, {name}",
    "Can you ship {qty} {item} to {city}? Needed by {date}. - {name}",
    "We need {qty} {item} for the {city} shop, arriving {date}. Cheers, {name}",
    "Good morning, {name} from {city}. Please put me down for {qty} {item}, delivery {date}.",
    "hey its {name}, {qty} {item} to {city} on {date} pls",
    "Please deliver {qty} {item} on {date} to {city}. Regards, {name}.",
    "{name} ({city}) wants {qty} {item} delivered on {date}.",
    "Reorder: {qty} {item}. Ship to {city}, {date}. Contact: {name}.",
    "Dear team, {name} would like {qty} {item} in {city} for {date}. Thank you!",
]
WITHOUT_CITY = [
    "Hi, {name} here. I'd like {qty} {item}, delivered on {date} please.",
    "Could you send {qty} {item} on {date}? Thanks, {name}",
    "Order: {qty} {item} for {name}, needed {date}.",
    "{name} wants {qty} {item} by {date}.",
    "hello, {qty} {item} for {date} please - {name}",
]


def render_date(rng: random.Random, month: int, day: int) -> str:
    name = MONTHS[month - 1]
    ordinal = f"{day}{DAY_SUFFIX.get(day, 'th')}"
    forms = [f"{name} {day}", f"{day} {name}", f"{name} {ordinal}", f"the {ordinal} of {name}", f"{name[:3]} {day}"]
    return rng.choice(forms)


def make_example(rng: random.Random) -> tuple[str, dict]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    qty = rng.randint(1, 12)
    plural = f"{rng.choice(COLOURS)} {rng.choice(THINGS)}"
    colour, thing = plural.split(" ", 1)
    item = plural if qty > 1 else f"{colour} {SINGULAR.get(thing, thing[:-1])}"
    qty_text = NUMBER_WORDS[qty - 1] if rng.random() < 0.4 else str(qty)
    if qty == 1 and rng.random() < 0.5:
        qty_text = "a"
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    city = rng.choice(CITIES) if rng.random() < 0.8 else None
    template = rng.choice(WITH_CITY if city else WITHOUT_CITY)
    message = template.format(name=name, qty=qty_text, item=item, city=city, date=render_date(rng, month, day))
    answer = {"name": name, "item": item, "qty": qty, "city": city, "date": f"{month:02d}-{day:02d}"}
    return message, answer


def to_chat(message: str, answer: dict) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": message},
                         {"role": "assistant", "content": json.dumps(answer)}]}


def make_splits(sizes: dict[str, int], seed: int = 20261101) -> dict[str, list[dict]]:
    """Examples per split from one seeded stream; a message is never in two splits (nor twice in one)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        rows = []
        while len(rows) < size:
            message, answer = make_example(rng)
            if message in seen:
                continue
            seen.add(message)
            rows.append(to_chat(message, answer))
        splits[split] = rows
    return splits


SIZES = {"test": 50, "valid": 40, "train": 600}


def render_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the JSONL files")
    parser.add_argument("--check", action="store_true", help="only compare with the files in --out")
    args = parser.parse_args(argv)
    stale = []
    for split, rows in make_splits(SIZES).items():
        path = args.out / f"{split}.jsonl"
        text = render_jsonl(rows)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"{path}: {len(rows)} examples")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
