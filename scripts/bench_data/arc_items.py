#!/usr/bin/env python3
"""Writes the bench-loop ARC-format workload: 100 test items and 5 few-shot examples, in the
JSONL layout of allenai/ai2_arc (id, question, choices {text, label}, answerKey). Grade-school
science questions written for this benchmark (not ARC's), deterministic: OUT/test.jsonl,
OUT/fewshot.jsonl."""
import json, os, sys

FACTS = [
    ("Which gas do green plants take in from the air to make food?", "carbon dioxide", ["oxygen", "nitrogen", "helium"]),
    ("Which part of a plant takes in water from the soil?", "the roots", ["the leaves", "the flowers", "the seeds"]),
    ("What is the main source of energy for Earth's water cycle?", "the Sun", ["the Moon", "the wind", "volcanoes"]),
    ("Which state of matter has a fixed shape and volume?", "solid", ["liquid", "gas", "plasma"]),
    ("Which organ pumps blood through the human body?", "the heart", ["the lungs", "the liver", "the brain"]),
    ("Which tool is best for measuring the mass of a rock?", "a balance", ["a ruler", "a thermometer", "a compass"]),
    ("What causes day and night on Earth?", "Earth's rotation", ["Earth's orbit", "the Moon's phases", "the tides"]),
    ("Which of these animals is a mammal?", "a whale", ["a shark", "a frog", "a lizard"]),
    ("Which form of energy does a battery store?", "chemical energy", ["sound energy", "light energy", "nuclear energy"]),
    ("What happens to water when it freezes?", "it expands", ["it boils", "it evaporates", "it shrinks a lot"]),
    ("Which layer of Earth do people live on?", "the crust", ["the mantle", "the outer core", "the inner core"]),
    ("Which material is the best conductor of electricity?", "copper", ["rubber", "glass", "wood"]),
    ("Which force pulls objects toward the center of Earth?", "gravity", ["friction", "magnetism", "tension"]),
    ("What do bees carry from flower to flower?", "pollen", ["sand", "salt", "seeds of grass"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Mars", "Jupiter"]),
    ("What is formed when water vapor cools high in the sky?", "clouds", ["rocks", "soil", "lava"]),
    ("Which body system breaks food into nutrients?", "the digestive system", ["the skeletal system", "the nervous system", "the immune system"]),
    ("Which change is a chemical change?", "wood burning", ["ice melting", "paper tearing", "glass breaking"]),
    ("What do fish use to take oxygen from water?", "gills", ["lungs", "fins", "scales"]),
    ("Which resource is renewable?", "wind", ["coal", "oil", "natural gas"]),
    ("Which simple machine is a ramp?", "an inclined plane", ["a pulley", "a lever", "a wheel"]),
]
FRAMES = ["{q}", "A student asks: {q}", "In a science class, a teacher asks: {q}", "{q} Choose the best answer.", "On a quiz: {q}"]

def item(k, frame, fact):
    q, right, wrong = fact
    rot = k % 4
    texts = wrong[:rot] + [right] + wrong[rot:]
    return {"id": f"bench-{k:03d}", "question": frame.format(q=q), "choices": {"text": texts, "label": list("ABCD")}, "answerKey": "ABCD"[rot]}

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rows = [item(k, FRAMES[k // len(FACTS) % len(FRAMES)], FACTS[k % len(FACTS)]) for k in range(105)]
with open(os.path.join(out, "fewshot.jsonl"), "w") as f:
    for r in rows[100:]:
        f.write(json.dumps(r) + "\n")
with open(os.path.join(out, "test.jsonl"), "w") as f:
    for r in rows[:100]:
        f.write(json.dumps(r) + "\n")
