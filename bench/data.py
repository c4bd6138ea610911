"""Data pipeline throughput: read + encode + pack short conversations with the default tokenizer.

    .venv/bin/python bench/data.py [--count 100000] [--max-seq-len 2048] [--batch-size 8]

Writes ``--count`` seeded synthetic conversations (1-3 turns, some with a system prompt) to a temporary
JSONL file, then times each stage the way training runs it: reading and normalising the file,
encoding with the SmolLM2 chat template (prefix-by-prefix masks), and packing into ``--max-seq-len`` rows
collated into batches. Prints examples/s and tokens/s per stage and overall.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import peak_rss_gib, print_table  # noqa: E402

WORDS = ("the a to of and in is it you that for on with as was this are be at by not what how why can "
         "bread oven dough flour water salt yeast bake rise knead warm cold time minutes hours temperature "
         "recipe cup gram spoon butter sugar egg milk cheese tomato garlic onion pasta rice soup sauce").split()


class Stage:
    """Wall and CPU time of one stage (CPU time shows the cost when other processes share the cores)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def synthetic_conversations(count: int, seed: int = 0):
    rng = random.Random(seed)

    def sentence(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    for _ in range(count):
        messages = [{"role": "system", "content": sentence(4, 10)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            messages.append({"role": "user", "content": sentence(5, 25)})
            messages.append({"role": "assistant", "content": sentence(5, 40)})
        yield {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from homebake.data.encode import Encoder
    from homebake.data.formats import SkipLog, load_conversations
    from homebake.data.pack import collate, packing_efficiency, row_groups
    from homebake.default_model import ensure_default_model
    from homebake.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(ensure_default_model(quiet=True)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.jsonl")
        with open(path, "w", encoding="utf-8") as handle:
            for record in synthetic_conversations(args.count):
                handle.write(json.dumps(record) + "\n")
        log = SkipLog()
        with Stage() as read:
            conversations = load_conversations([path], log=log).conversations
    encoder = Encoder(tokenizer, max_seq_len=args.max_seq_len)
    with Stage() as encode:
        examples = [encoder(c) for c in conversations]
    with Stage() as pack:
        rows = row_groups(examples, max_seq_len=args.max_seq_len, packing=True, seed=0)
        batches = [collate(examples, rows[i:i + args.batch_size], tokenizer.pad_token_id)
                   for i in range(0, len(rows), args.batch_size)]
    count = len(examples)
    tokens = sum(len(e.ids) for e in examples)
    trained = sum(e.num_trained for e in examples)
    assert not log.items and sum(b.num_real_tokens for b in batches) == tokens
    stages = (("read + normalise", read), ("encode (template + mask)", encode), ("pack + collate", pack))
    table = []
    for name, wall, cpu in [*((n, st.wall, st.cpu) for n, st in stages),
                            ("total", sum(st.wall for _, st in stages), sum(st.cpu for _, st in stages))]:
        table.append({"stage": name, "wall s": f"{wall:.2f}", "cpu s": f"{cpu:.2f}",
                      "examples/s": f"{count / wall:,.0f}", "tokens/s": f"{tokens / wall:,.0f}",
                      "tokens/cpu-s": f"{tokens / cpu:,.0f}"})
    print(f"{count:,} conversations, {tokens:,} tokens ({trained / tokens:.1%} trained), "
          f"{len(rows):,} rows of {args.max_seq_len} ({packing_efficiency(examples, rows, args.max_seq_len):.1%} full), "
          f"peak RSS {peak_rss_gib():.2f} GiB, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print_table(table, ["stage", "wall s", "cpu s", "examples/s", "tokens/s", "tokens/cpu-s"])


if __name__ == "__main__":
    main()
