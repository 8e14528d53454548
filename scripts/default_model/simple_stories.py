"""A procedurally generated corpus of short, simple English stories (TinyStories-like) for the default model.

No simple-English story corpus ships in a package this project can install offline, and a 9M-parameter model
cannot become fluent on 19th-century novels alone. So the stories come from a small hand-written grammar (this file,
Apache-2.0 like the rest of minke): a hero (a child or an animal), a place, a wish or a problem, what they do, who
helps, how it ends, sometimes a line of dialogue and a moral. Every story is about its `topic`, so the fine-tuning
pairs "Tell me a story about X." -> a story about X teach the model to stay on topic.

    python scripts/default_model/simple_stories.py --out_dir build/default_model/stories --num_stories 40000
writes stories.jsonl ({"text", "topic"}) and story_requests.jsonl ({"instruction", "output"}).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Emma", "Sam", "Lucy", "Jack", "Zoe", "Tim",
         "Ella", "Finn", "Nora", "Jake", "Ruby", "Noah", "Kate", "Ollie", "Rosa", "Dan"]
ANIMALS = {  # topic word -> (name options, a sound or habit)
    "cat": (["Whiskers", "Mittens", "Tiger"], "purred softly"),
    "dog": (["Buddy", "Rex", "Spot"], "wagged its tail"),
    "bird": (["Tweety", "Sky", "Pip"], "sang a happy song"),
    "rabbit": (["Hoppy", "Snow", "Clover"], "twitched its nose"),
    "fox": (["Rusty", "Red", "Flick"], "looked around with bright eyes"),
    "bear": (["Bruno", "Honey", "Teddy"], "gave a big yawn"),
    "duck": (["Daisy", "Quack", "Puddle"], "splashed in the water"),
    "mouse": (["Squeak", "Tiny", "Pip"], "nibbled a piece of cheese"),
    "frog": (["Hopper", "Green", "Lily"], "jumped from leaf to leaf"),
    "owl": (["Hoot", "Luna", "Sage"], "blinked its big round eyes"),
    "fish": (["Bubbles", "Finny", "Goldie"], "swam in little circles"),
    "horse": (["Star", "Thunder", "Maple"], "ran fast across the field"),
    "turtle": (["Shelly", "Slow", "Moss"], "moved slowly but surely"),
    "lion": (["Leo", "Sunny", "King"], "shook its golden mane"),
    "elephant": (["Ellie", "Jumbo", "Pebble"], "sprayed water with its trunk"),
    "puppy": (["Biscuit", "Patch", "Lucky"], "licked everyone's hands"),
    "kitten": (["Fluffy", "Button", "Socks"], "chased a ball of yarn"),
    "dragon": (["Sparky", "Ember", "Flame"], "blew tiny puffs of smoke"),
    "monkey": (["Coco", "Banana", "Chip"], "swung from branch to branch"),
    "squirrel": (["Nutty", "Acorn", "Zip"], "hid nuts under the tree"),
}
OBJECTS = {  # topic word -> (adjectives, where it can be)
    "ball": (["red", "bouncy", "shiny"], "in the garden"),
    "kite": (["blue", "long", "bright"], "in the sky"),
    "boat": (["little", "wooden", "white"], "on the lake"),
    "tree": (["tall", "old", "green"], "in the park"),
    "flower": (["pretty", "yellow", "small"], "in the garden"),
    "cake": (["sweet", "big", "chocolate"], "on the table"),
    "train": (["toy", "fast", "long"], "on the track"),
    "star": (["bright", "tiny", "golden"], "in the night sky"),
    "hat": (["funny", "big", "green"], "on the shelf"),
    "book": (["old", "magic", "thick"], "in the library"),
    "box": (["mysterious", "heavy", "small"], "under the bed"),
    "car": (["red", "toy", "shiny"], "in the street"),
    "garden": (["sunny", "quiet", "big"], "behind the house"),
    "rain": (["soft", "cold", "heavy"], "outside the window"),
    "snow": (["white", "soft", "deep"], "on the hill"),
    "moon": (["round", "silver", "bright"], "above the trees"),
    "sea": (["blue", "deep", "calm"], "near the town"),
    "castle": (["tall", "old", "stone"], "on the hill"),
    "robot": (["friendly", "little", "silver"], "in the workshop"),
    "balloon": (["red", "big", "round"], "at the fair"),
    "bike": (["new", "blue", "fast"], "by the door"),
    "shell": (["pink", "pretty", "smooth"], "on the beach"),
    "cookie": (["warm", "sweet", "crunchy"], "in the jar"),
    "friend": (["kind", "new", "good"], "at school"),
    "school": (["big", "busy", "bright"], "down the road"),
    "park": (["green", "sunny", "busy"], "near the house"),
    "forest": (["dark", "quiet", "deep"], "beyond the river"),
    "river": (["long", "cool", "fast"], "past the farm"),
    "rainbow": (["bright", "big", "colorful"], "in the sky"),
    "toy": (["new", "little", "favorite"], "in the toy box"),
}
PLACES = ["in a small house by the sea", "in a little village", "on a big farm", "in a busy town",
          "near a quiet forest", "in a house with a red door", "by a sunny park", "at the edge of a green hill"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "thankful"]
FEELINGS_BAD = ["sad", "worried", "scared", "upset", "lonely"]
HELPERS = ["Mom", "Dad", "Grandma", "Grandpa", "a kind old man", "a wise owl", "a friendly neighbor", "the teacher"]
MORALS = [
    "It is good to share with your friends.",
    "Being kind makes everyone happy.",
    "If you try again, you can do it.",
    "It is okay to ask for help.",
    "Friends help each other.",
    "Being brave is not the same as not being scared.",
    "Saying sorry can fix a lot of things.",
    "Little things can make a big difference.",
    "It is fun to learn new things.",
    "Taking care of others is important.",
]
TIMES = ["Once upon a time", "One day", "One sunny morning", "Long ago", "One rainy afternoon", "One cold winter day",
         "Once", "One warm summer evening"]
ENDINGS = ["From that day on", "After that", "Every day after that", "Since then"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def animal_story(topic: str, rng: random.Random) -> str:
    names, habit = ANIMALS[topic]
    pet, child = rng.choice(names), rng.choice(NAMES)
    place, time = rng.choice(PLACES), rng.choice(TIMES)
    bad, good, helper = rng.choice(FEELINGS_BAD), rng.choice(FEELINGS_GOOD), rng.choice(HELPERS)
    kind = rng.randrange(4)
    s = [f"{time}, there was {_a(topic)} named {pet}. {pet} lived {place} with a {rng.choice(['little girl', 'little boy'])} named {child}."]
    s.append(f"Every morning, {pet} {habit}, and {child} laughed.")
    if kind == 0:
        s.append(f"One day, {pet} could not find the way home. {pet} felt {bad} and alone.")
        s.append(f"{child} looked everywhere. \"{pet}, where are you?\" {child} called.")
        s.append(f"{_cap(helper)} helped {child} look behind the trees and under the bushes.")
        s.append(f"At last, they found {pet} near the old gate. {child} gave {pet} a big hug.")
        s.append(f"{pet} was {good} to be home again.")
    elif kind == 1:
        s.append(f"One day, {pet} saw another {topic} sitting all alone. The other {topic} looked {bad}.")
        s.append(f"\"Do you want to play with me?\" asked {pet}. The other {topic} smiled and said, \"Yes, please!\"")
        s.append(f"They played all day in the sun. They ran, they jumped, and they shared a snack.")
        s.append(f"When it was time to go home, they were both {good}. They had a new friend.")
    elif kind == 2:
        obj = rng.choice(list(OBJECTS))
        adj = rng.choice(OBJECTS[obj][0])
        s.append(f"One day, {child} lost {_a(adj + ' ' + obj)}. {child} was very {bad}.")
        s.append(f"{pet} wanted to help. {pet} looked in the grass and under the chair.")
        s.append(f"Then {pet} found the {obj} {OBJECTS[obj][1]} and brought it back.")
        s.append(f"\"Thank you, {pet}!\" said {child}. {child} was so {good} that {pet} {habit} again.")
    else:
        s.append(f"One day, {pet} wanted to climb the big hill to see the whole world.")
        s.append(f"The hill was very high, and {pet} was a little {bad}. But {pet} did not give up.")
        s.append(f"Step by step, {pet} went up and up. At the top, {pet} could see the houses, the fields and the river.")
        s.append(f"{pet} felt {good}. It was the best day ever.")
    if rng.random() < 0.7:
        s.append(f"{rng.choice(ENDINGS)}, {child} and {pet} were the best of friends.")
    if rng.random() < 0.5:
        s.append(rng.choice(MORALS))
    return " ".join(s)


def object_story(topic: str, rng: random.Random) -> str:
    adjs, where = OBJECTS[topic]
    adj, child, friend = rng.choice(adjs), rng.choice(NAMES), rng.choice(NAMES)
    while friend == child:
        friend = rng.choice(NAMES)
    time, bad, good, helper = rng.choice(TIMES), rng.choice(FEELINGS_BAD), rng.choice(FEELINGS_GOOD), rng.choice(HELPERS)
    kind = rng.randrange(4)
    s = [f"{time}, a child named {child} saw {_a(adj + ' ' + topic)} {where}."]
    if kind == 0:
        s.append(f"{child} loved the {topic} very much. {child} showed it to {friend}.")
        s.append(f"\"Can I play with the {topic} too?\" asked {friend}.")
        s.append(f"At first {child} did not want to share. Then {child} saw that {friend} was {bad}.")
        s.append(f"\"Yes, we can play together,\" said {child}. They played with the {topic} all afternoon.")
        s.append(f"Sharing made them both {good}.")
    elif kind == 1:
        s.append(f"{child} wanted to learn everything about the {topic}. {child} asked {helper} many questions.")
        s.append(f"{_cap(helper)} smiled and told {child} a lot about the {topic}.")
        s.append(f"{child} listened and learned. Soon {child} could tell {friend} all about it too.")
        s.append(f"{child} felt {good} and wanted to learn more every day.")
    elif kind == 2:
        s.append(f"But then something went wrong. The {topic} was gone! {child} felt {bad}.")
        s.append(f"{child} and {friend} looked high and low. They asked {helper} for help.")
        s.append(f"Together they found the {topic} at last. It was safe.")
        s.append(f"\"Thank you for helping me,\" said {child}. Everyone was {good}.")
    else:
        s.append(f"{child} thought the {topic} was the most wonderful thing in the world.")
        s.append(f"Every day, {child} went to see the {topic}. {child} told {friend} about it.")
        s.append(f"One day, {friend} came too. {friend} looked at the {topic} and said, \"You are right, it is wonderful!\"")
        s.append(f"The two friends were {good}. They made a plan to come back the next day.")
    if rng.random() < 0.5:
        s.append(rng.choice(MORALS))
    return " ".join(s)


TOPICS = list(ANIMALS) + list(OBJECTS)


def story(topic: str, rng: random.Random) -> str:
    return animal_story(topic, rng) if topic in ANIMALS else object_story(topic, rng)


REQUESTS = ["Tell me a story about {a}.", "Tell me a story about the {t}.", "Can you tell me a story about {a}?",
            "Write a short story about {a}.", "I want a story about {a}.", "Please tell me a story about {a}.",
            "Tell me a short story about {a}.", "Write a story for a child about {a}."]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out_dir", type=Path, required=True)
    ap.add_argument("--num_stories", type=int, default=40000)
    ap.add_argument("--num_requests", type=int, default=4000)
    ap.add_argument("--num_valid", type=int, default=200, help="held-out stories (their own random stream)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    with open(a.out_dir / "stories.jsonl", "w") as f:
        for _ in range(a.num_stories):
            t = rng.choice(TOPICS)
            f.write(json.dumps({"text": story(t, rng), "topic": t}) + "\n")
    with open(a.out_dir / "story_requests.jsonl", "w") as f:
        for _ in range(a.num_requests):
            t = rng.choice(TOPICS)
            req = rng.choice(REQUESTS).format(a=_a(t), t=t)
            f.write(json.dumps({"instruction": req, "output": story(t, rng)}) + "\n")
    vrng = random.Random(a.seed + 1_000_003)
    with open(a.out_dir / "stories_valid.jsonl", "w") as f:
        for _ in range(a.num_valid):
            t = vrng.choice(TOPICS)
            f.write(json.dumps({"text": story(t, vrng), "topic": t}) + "\n")
    stats = {"stories": a.num_stories, "story_requests": a.num_requests, "valid_stories": a.num_valid,
             "topics": TOPICS, "seed": a.seed}
    (a.out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    print(f"{a.num_stories} stories, {a.num_requests} story requests, {len(TOPICS)} topics -> {a.out_dir}")


if __name__ == "__main__":
    main()
