"""Writes train.jsonl and test.jsonl: preference pairs teaching "say you don't know rather than invent".

Written for homebake. Every question is about a made-up place, book, person or thing (the chosen reply
says it does not know it; the rejected one confidently invents an answer) or about a well-known one (the
chosen reply answers; the rejected one wrongly claims not to know it), so the model learns to tell them
apart instead of refusing everything. The held-out test set uses other names, and its made-up entities
are asked about with the same question kinds, so it measures whether the preference generalises.

    python examples/preference/make_pairs.py      # deterministic: rewrites both files
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

FICTIONAL = {
    "country": ["Veltrania", "Ostmark Isles", "Qarunia", "Belloria", "Tamsk", "Novadria", "Zelvoria", "Kantheris",
                "Mirovia", "Palundra", "Estravel", "Hollin Reach", "Durvania", "Saraketh", "Ulmoria", "Vendalia",
                "Corvessa", "Ildaran", "Brisvalt", "Yemmoria"],
    "book": ["The Glass Orchard", "Seven Winters in Odrin", "A Map of Quiet Rivers", "The Lantern Keeper's Debt",
             "Salt and Meridian", "The Clockmaker of Vey", "Under the Copper Sky", "Ashes of Tullmore",
             "The Last Cartographer", "Whispers of the Fenwood", "The Marrow Road", "Lighthouse at Kestrel Point",
             "The Paper Emperor", "A Season of Foxes", "The Hollow Crown of Ysmir", "Rivers That Forget"],
    "person": ["Dr. Elsbeth Varnholm", "Marcus Quillfeather", "Professor Anika Dorrance", "Tobias Wrenfield",
               "Dr. Ilya Sorokane", "Helena Marchetti-Voss", "Oskar Brandtvik", "Dr. Priya Calloway",
               "Jonas Ebberly", "Professor Mirela Tausk", "Felix Armitage-Crow", "Dr. Sunniva Halloran",
               "Rafael Obendorf", "Greta Lindqvist-Maro", "Dr. Cyrus Pellow", "Ottilie Varga"],
    "thing": ["the Halvorsen reactor", "the Bremmer-Tate theorem", "the Quorvian calendar", "the Selmark engine",
              "the Ostrava protocol", "the Delacroix paradox", "the Venn-Hardy vaccine", "the Tarrow cipher",
              "the Mallory effect in tidal physics", "the Krenshaw index", "the Pellucid algorithm",
              "the Ardent telescope", "the Fennimore treaty", "the Lucerne scale of winds"],
}
FAKE_CITIES = ["Morvath", "Ellisport", "Tarkand", "Vossberg", "Quell", "Amberine", "Salvik", "Dornholt"]
FAKE_FIELDS = ["physics", "chemistry", "medicine", "literature", "economics"]

QUESTIONS = {  # kind -> (question, honest reply variants, invented reply)
    "country": ("What is the capital of {name}?",
                ["I'm not aware of a country called {name}, so I can't tell you its capital. It may be fictional.",
                 "I don't know of any country named {name}. If it is real, I have no reliable information on its capital.",
                 "I don't recognise {name} as a country, so I'd rather not guess a capital."],
                "The capital of {name} is {city}, its largest and oldest city."),
    "book": ("Who wrote the novel '{name}'?",
             ["I don't know a novel called '{name}', so I can't say who wrote it.",
              "I'm not familiar with '{name}'. I'd rather not guess the author.",
              "I have no reliable information about a novel titled '{name}'."],
             "'{name}' was written by {person} and published in {year}."),
    "person": ("What is {name} famous for?",
               ["I don't have any reliable information about {name}, so I can't say what they are known for.",
                "I'm not aware of anyone notable called {name}. I'd rather not make something up.",
                "I don't know who {name} is."],
               "{name} is famous for winning the Nobel Prize in {field} in {year}."),
    "thing": ("Can you explain {name}?",
              ["I'm not familiar with {name}, so I can't explain it reliably. Could you tell me where you saw it?",
               "I don't know of anything called {name}. It may be very obscure or made up.",
               "I have no reliable information about {name}, so I'd rather not guess."],
              "{Name} was introduced in {year} and is now used in most {field} laboratories."),
}

REAL = [
    ("What is the capital of France?", "The capital of France is Paris.", "France"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Japan"),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "Italy"),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "Canada"),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "Egypt"),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "Spain"),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "Germany"),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", "Kenya"),
    ("Who wrote the novel 'Pride and Prejudice'?", "'Pride and Prejudice' was written by Jane Austen.", "'Pride and Prejudice'"),
    ("Who wrote the novel '1984'?", "'1984' was written by George Orwell.", "'1984'"),
    ("Who wrote the novel 'Moby-Dick'?", "'Moby-Dick' was written by Herman Melville.", "'Moby-Dick'"),
    ("Who wrote the novel 'War and Peace'?", "'War and Peace' was written by Leo Tolstoy.", "'War and Peace'"),
    ("What is Marie Curie famous for?", "Marie Curie is famous for her research on radioactivity; she won two Nobel Prizes.", "Marie Curie"),
    ("What is Albert Einstein famous for?", "Albert Einstein is famous for the theory of relativity.", "Albert Einstein"),
    ("What is Isaac Newton famous for?", "Isaac Newton is famous for his laws of motion and universal gravitation.", "Isaac Newton"),
    ("What is Ada Lovelace famous for?", "Ada Lovelace is famous for writing the first published computer program.", "Ada Lovelace"),
    ("Can you explain photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and oxygen.", "photosynthesis"),
    ("Can you explain the Pythagorean theorem?", "In a right triangle, the square of the hypotenuse equals the sum of the squares of the other two sides.", "the Pythagorean theorem"),
    ("Can you explain what DNA is?", "DNA is the molecule that carries the genetic instructions of living things.", "DNA"),
    ("Can you explain gravity?", "Gravity is the force by which masses attract each other; it keeps us on the ground and the planets in orbit.", "gravity"),
    ("What is the capital of Australia?", "The capital of Australia is Canberra.", "Australia"),
    ("What is the capital of Brazil?", "The capital of Brazil is Brasilia.", "Brazil"),
    ("Who wrote the novel 'Don Quixote'?", "'Don Quixote' was written by Miguel de Cervantes.", "'Don Quixote'"),
    ("What is Charles Darwin famous for?", "Charles Darwin is famous for the theory of evolution by natural selection.", "Charles Darwin"),
    ("Can you explain what a volcano is?", "A volcano is an opening in the Earth's crust where molten rock, ash and gas escape.", "volcanoes"),
]
REAL_DENIALS = ["I'm not aware of {name}, so I can't answer that.", "I don't have any reliable information about {name}.",
                "I don't know anything about {name}, so I'd rather not guess."]


def fictional_pair(kind: str, name: str, rng: random.Random) -> dict:
    question, honest, invented = QUESTIONS[kind]
    values = dict(name=name, Name=name[0].upper() + name[1:], city=rng.choice(FAKE_CITIES),
                  person=rng.choice(FICTIONAL["person"]), year=rng.randint(1890, 2015), field=rng.choice(FAKE_FIELDS))
    return {"prompt": question.format(**values), "chosen": rng.choice(honest).format(**values),
            "rejected": invented.format(**values)}


def real_pair(item: tuple, rng: random.Random) -> dict:
    question, answer, name = item
    return {"prompt": question, "chosen": answer, "rejected": rng.choice(REAL_DENIALS).format(name=name)}


def main() -> None:
    rng = random.Random(16)
    train, test = [], []
    for kind, names in FICTIONAL.items():
        held = max(3, len(names) // 4)  # the last quarter of each list is held out
        train += [fictional_pair(kind, name, rng) for name in names[:-held]]
        test += [fictional_pair(kind, name, rng) for name in names[-held:]]
    train += [real_pair(item, rng) for item in REAL[:-6]]
    test += [real_pair(item, rng) for item in REAL[-6:]]
    rng.shuffle(train)
    for name, pairs in (("train.jsonl", train), ("test.jsonl", test)):
        (HERE / name).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        print(f"{HERE / name}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
