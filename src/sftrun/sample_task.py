"""The bundled sample task: turn a short order note into a fixed JSON record.

Owns a deterministic generator of train and held-out data in the ``messages`` format. The
base model does not produce the exact JSON (key names, order, types) before training and
learns it in the default run, which makes the effect of fine-tuning visible in one number.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You turn order notes into JSON."
INSTRUCTION = (
    'Extract the order as JSON with keys "name", "city", "product" and "quantity" '
    "(an integer).\nNote: "
)

FIRST = [
    "Maria",
    "John",
    "Aisha",
    "Kenji",
    "Lena",
    "Omar",
    "Priya",
    "Lucas",
    "Sofia",
    "Mateo",
    "Chen",
    "Fatima",
    "Noah",
    "Elena",
    "Ivan",
    "Zara",
    "Diego",
    "Hana",
    "Tom",
    "Amara",
    "Felix",
    "Nina",
    "Rahul",
    "Grace",
    "Yusuf",
    "Clara",
    "Leo",
    "Mei",
    "Oscar",
    "Ines",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Tanaka",
    "Novak",
    "Haddad",
    "Patel",
    "Silva",
    "Rossi",
    "Garcia",
    "Wang",
    "Okafor",
    "Brown",
    "Petrova",
    "Ivanov",
    "Ahmed",
    "Torres",
    "Sato",
    "Miller",
    "Mensah",
    "Weber",
    "Berg",
    "Gupta",
    "Kim",
    "Demir",
    "Costa",
    "Fischer",
    "Li",
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Osaka",
    "Prague",
    "Beirut",
    "Pune",
    "Recife",
    "Turin",
    "Seville",
    "Dalian",
    "Lagos",
    "Leeds",
    "Sofia",
    "Kazan",
    "Cairo",
    "Lima",
    "Kyoto",
    "Denver",
    "Accra",
    "Bremen",
    "Bergen",
    "Jaipur",
    "Busan",
    "Izmir",
    "Porto",
    "Graz",
]
PRODUCTS = [
    "desk lamps",
    "notebooks",
    "coffee mugs",
    "office chairs",
    "water bottles",
    "backpacks",
    "phone chargers",
    "wall clocks",
    "yoga mats",
    "tea kettles",
    "umbrellas",
    "headphones",
    "picture frames",
    "garden hoses",
    "bike helmets",
    "cutting boards",
    "table fans",
]
TEMPLATES = [
    "Hi, this is {name} from {city}. Please send me {qty} {product}.",
    "{name} ({city}) wants {qty} {product}.",
    "Order: {qty} x {product}, customer {name}, ship to {city}.",
    "Could you ship {qty} {product} to {city}? Thanks, {name}",
    "{city} branch, {name} speaking: we need {qty} more {product}.",
    "Customer {name} in {city} ordered {qty} {product} today.",
    "Please deliver {qty} {product} to {name} in {city}.",
    "New order from {name}, {city}: {product}, quantity {qty}.",
]


def make_example(rnd: random.Random) -> dict[str, object]:
    """One record of the sample task: a note and the JSON order it holds."""
    name = f"{rnd.choice(FIRST)} {rnd.choice(LAST)}"
    city = rnd.choice(CITIES)
    product = rnd.choice(PRODUCTS)
    qty = rnd.randint(2, 60)
    note = rnd.choice(TEMPLATES).format(name=name, city=city, product=product, qty=qty)
    answer = json.dumps({"name": name, "city": city, "product": product, "quantity": qty})
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": INSTRUCTION + note},
            {"role": "assistant", "content": answer},
        ]
    }


def write_sample_data(
    out_dir: str | Path, n_train: int = 320, n_eval: int = 40, seed: int = 1234
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl``; the same arguments give the same bytes.

    Held-out notes never repeat a training note.
    """
    rnd = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows: list[str] = []
    while len(rows) < n_train + n_eval:
        line = json.dumps(make_example(rnd), ensure_ascii=False)
        if line not in seen:
            seen.add(line)
            rows.append(line)
    train, held_out = out / "train.jsonl", out / "eval.jsonl"
    train.write_text("\n".join(rows[:n_train]) + "\n", encoding="utf-8")
    held_out.write_text("\n".join(rows[n_train:]) + "\n", encoding="utf-8")
    return train, held_out
