"""Regenerate the small training fixtures: a generated-dataset shard, a BPE tokenizer, eval tasks.

Run from the repository root: `python tests/data/training/make_data.py`. The outputs are
committed, so tests never run this; it documents where the bytes came from. The texts are
written here for the tests (simple facts in textbook, blog and how-to voices), and the eval
rows follow the real column layout of each benchmark on the Hub.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent

TOPICS = {
    "plant cells": [
        "Plant cells have a rigid wall made of cellulose.",
        "Chloroplasts inside the cell capture light to make sugar.",
        "A large vacuole stores water and keeps the cell firm.",
        "The nucleus holds the instructions the cell follows.",
    ],
    "the water cycle": [
        "The sun warms the ocean and water evaporates into the air.",
        "Water vapour cools high in the sky and condenses into clouds.",
        "Rain and snow fall back to the ground as precipitation.",
        "Rivers carry the water back to the sea, and the cycle begins again.",
    ],
    "fractions": [
        "A fraction names a part of a whole, such as one half or three quarters.",
        "The number on the bottom tells how many equal parts the whole has.",
        "The number on top tells how many of those parts we take.",
        "Two fractions are equal when they describe the same amount.",
    ],
    "volcanoes": [
        "A volcano is an opening in the crust where melted rock escapes.",
        "Melted rock under the ground is called magma.",
        "When magma reaches the surface it is called lava.",
        "Layers of cooled lava and ash build the cone of a volcano.",
    ],
    "the heart": [
        "The heart is a muscle that pumps blood through the body.",
        "It has four chambers: two atria and two ventricles.",
        "Arteries carry blood away from the heart.",
        "Veins bring blood back to the heart.",
    ],
    "saving money": [
        "Saving money means keeping part of what you earn for later.",
        "A budget lists what comes in and what goes out each month.",
        "Small amounts saved every week add up over a year.",
        "Interest is the extra money a bank pays on savings.",
    ],
    "magnets": [
        "Every magnet has a north pole and a south pole.",
        "Opposite poles attract and like poles push each other away.",
        "Iron and steel are pulled toward a magnet.",
        "The earth itself behaves like a giant magnet.",
    ],
    "photosynthesis": [
        "Plants use light, water and carbon dioxide to make food.",
        "Oxygen is released into the air as a result.",
        "Leaves are green because of a pigment called chlorophyll.",
        "Without photosynthesis there would be little oxygen to breathe.",
    ],
}

OPENINGS = {
    "textbook": "In this section we study {topic}.",
    "blog_post": "Have you ever wondered about {topic}? Let us take a closer look.",
    "wikihow": "How to understand {topic}. Follow these steps.",
}
CLOSINGS = {
    "young_children": "Now you know a little more about {topic}!",
    "high_school_students": "These ideas about {topic} come up again in later chapters.",
    "college_students": "A careful study of {topic} connects several of these facts.",
    "researchers": "Open questions about {topic} remain an active area of work.",
}
SOURCES = {"textbook": "openstax-outlines", "blog_post": "web-samples", "wikihow": "wikihow-titles"}


def documents(count: int, seed: int = 7) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        topic = rng.choice(sorted(TOPICS))
        style = rng.choice(sorted(OPENINGS))
        audience = rng.choice(sorted(CLOSINGS))
        facts = TOPICS[topic][:]
        rng.shuffle(facts)
        body = facts + rng.sample(TOPICS[topic], k=2)
        if style == "wikihow":
            body = [f"Step {n}: {fact}" for n, fact in enumerate(body, start=1)]
        text = " ".join([OPENINGS[style].format(topic=topic), *body, CLOSINGS[audience].format(topic=topic)])
        prompt = f"Write a {style.replace('_', ' ')} about {topic} for {audience.replace('_', ' ')}."
        prompt_id = hashlib.sha256(f"fixture:{index}:{prompt}".encode()).hexdigest()[:16]
        rows.append(
            {
                "prompt_id": prompt_id,
                "run": "fixture",
                "seed_source": SOURCES[style],
                "seed_kind": "outline"
                if style == "textbook"
                else ("wikihow" if style == "wikihow" else "web"),
                "seed_id": f"{index:04d}",
                "audience": audience,
                "style": style,
                "topic": topic,
                "prompt": prompt,
                "text": text,
                "model": "fixture-writer",
            }
        )
    return rows


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


# Each benchmark's columns as published on the Hub; values written for these tests.
EVAL_TASKS: dict[str, tuple[str, list[dict[str, object]]]] = {
    "arc_easy": (
        "test",
        [
            {
                "id": "fx-arc-e-1",
                "question": "What do plants use to capture light?",
                "choices": {
                    "text": ["chloroplasts", "bones", "magnets", "rivers"],
                    "label": ["A", "B", "C", "D"],
                },
                "answerKey": "A",
            },
            {
                "id": "fx-arc-e-2",
                "question": "What is melted rock under the ground called?",
                "choices": {"text": ["lava", "magma", "ash", "sand"], "label": ["A", "B", "C", "D"]},
                "answerKey": "B",
            },
            {
                "id": "fx-arc-e-3",
                "question": "Which organ pumps blood through the body?",
                "choices": {"text": ["the lung", "the heart", "the leaf"], "label": ["1", "2", "3"]},
                "answerKey": "2",
            },
        ],
    ),
    "arc_challenge": (
        "test",
        [
            {
                "id": "fx-arc-c-1",
                "question": "Water vapour high in the sky cools and forms what?",
                "choices": {"text": ["clouds", "rocks", "lava", "iron"], "label": ["A", "B", "C", "D"]},
                "answerKey": "A",
            },
            {
                "id": "fx-arc-c-2",
                "question": "Which gas do plants release during photosynthesis?",
                "choices": {
                    "text": ["carbon dioxide", "oxygen", "steam", "smoke"],
                    "label": ["A", "B", "C", "D"],
                },
                "answerKey": "B",
            },
        ],
    ),
    "openbookqa": (
        "test",
        [
            {
                "id": "fx-obqa-1",
                "question_stem": "Like poles of two magnets",
                "choices": {"text": ["attract", "push away", "melt", "grow"], "label": ["A", "B", "C", "D"]},
                "answerKey": "B",
            },
            {
                "id": "fx-obqa-2",
                "question_stem": "Rivers carry water back to",
                "choices": {
                    "text": ["the sea", "the sun", "the moon", "the nucleus"],
                    "label": ["A", "B", "C", "D"],
                },
                "answerKey": "A",
            },
        ],
    ),
    "mmlu": (
        "test",
        [
            {
                "question": "What does the bottom number of a fraction tell?",
                "subject": "elementary_mathematics",
                "choices": ["how many equal parts", "the colour", "the weight", "the speed"],
                "answer": 0,
            },
            {
                "question": "Which vessels carry blood away from the heart?",
                "subject": "anatomy",
                "choices": ["veins", "arteries", "nerves", "bones"],
                "answer": 1,
            },
        ],
    ),
    "piqa": (
        "validation",
        [
            {
                "goal": "Keep money for later.",
                "sol1": "Save a small amount every week.",
                "sol2": "Spend it all today.",
                "label": 0,
            },
            {
                "goal": "Make a nail stick to a magnet.",
                "sol1": "Use a wooden nail.",
                "sol2": "Use an iron nail.",
                "label": 1,
            },
        ],
    ),
    "hellaswag": (
        "validation",
        [
            {
                "ind": 1,
                "activity_label": "Studying plants",
                "ctx_a": "A student looks at a leaf under a lens.",
                "ctx_b": "she",
                "ctx": "A student looks at a leaf under a lens. she",
                "endings": ["sees green chloroplasts.", "hears a song.", "drives a car.", "swims away."],
                "source_id": "fixture",
                "split": "val",
                "split_type": "indomain",
                "label": "0",
            },
            {
                "ind": 2,
                "activity_label": "Making a budget",
                "ctx_a": "A man writes down what he earns.",
                "ctx_b": "then he",
                "ctx": "A man writes down what he earns. then he",
                "endings": [
                    "eats the paper.",
                    "lists what goes out each month.",
                    "paints a wall.",
                    "sleeps.",
                ],
                "source_id": "fixture",
                "split": "val",
                "split_type": "indomain",
                "label": "1",
            },
        ],
    ),
    "siqa": (
        "validation",
        [
            {
                "context": "Sam saved money every week for a year.",
                "question": "How would Sam feel at the end of the year?",
                "answerA": "proud of the savings",
                "answerB": "angry at the bank",
                "answerC": "lost in a forest",
                "label": "1",
            },
            {
                "context": "Ana explained the water cycle to her brother.",
                "question": "Why did Ana do this?",
                "answerA": "to hide the water",
                "answerB": "to help him learn",
                "answerC": "to stop the rain",
                "label": "2",
            },
        ],
    ),
    "winogrande": (
        "validation",
        [
            {
                "sentence": "The magnet pulled the nail but not the stick because the _ was made of iron.",
                "option1": "nail",
                "option2": "stick",
                "answer": "1",
            },
            {
                "sentence": "Lava flowed over the snow and the _ melted quickly because it was cold.",
                "option1": "lava",
                "option2": "snow",
                "answer": "2",
            },
        ],
    ),
    "boolq": (
        "validation",
        [
            {
                "question": "do plants release oxygen",
                "answer": True,
                "passage": "Plants use light, water and carbon dioxide to make food, and release oxygen.",
            },
            {
                "question": "is lava found under the ground",
                "answer": False,
                "passage": "Melted rock under the ground is called magma; at the surface it is called lava.",
            },
        ],
    ),
}


def main() -> None:
    rows = documents(48)
    table = pa.Table.from_pylist(rows)
    dataset = HERE / "dataset"
    dataset.mkdir(exist_ok=True)
    pq.write_table(table.slice(0, 32), dataset / "part-00000.parquet")
    pq.write_table(table.slice(32), dataset / "part-00001.parquet")
    train_tokenizer([row["text"] for row in rows], vocab_size=600).save(str(HERE / "tokenizer.json"))
    for task, (split, records) in EVAL_TASKS.items():
        folder = HERE / "tasks" / task
        folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record) + "\n" for record in records)
        (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")


if __name__ == "__main__":
    main()
