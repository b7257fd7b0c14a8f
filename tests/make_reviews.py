"""Regenerate ``reviews.csv.gz``, the synthetic product-review dataset shipped with modal_magic.

The reviews are built from templates and word lists with a seeded :class:`random.Random`, so
running this module twice produces byte-identical output. It uses only the standard library
(no pandas), and writes the gzip container by hand (fixed header, no timestamp, no file name) so
the bytes do not depend on the Python version either; only the deflate stream comes from zlib.

Run ``python -m tests.make_reviews`` to rewrite the shipped file, or pass
``--out PATH`` to write somewhere else (the tests do that and compare the bytes).
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

SEED = 20240611
N_REVIEWS = 3000
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "modal_magic" / "datasets" / "reviews.csv.gz"
COLUMNS = ("review_id", "product", "text", "stars")


@dataclass(frozen=True)
class Category:
    """One product category: concrete product names, features to praise or blame, and uses."""

    products: tuple[tuple[str, bool], ...]  # (name, is_plural)
    features: tuple[str, ...]
    uses: tuple[str, ...]


CATEGORIES: tuple[Category, ...] = (
    Category(
        (("wireless headphones", True), ("earbuds", True), ("noise-cancelling headphones", True),
         ("gaming headset", False)),
        ("sound quality", "bass", "battery life", "noise cancelling", "ear cushions",
         "Bluetooth connection", "microphone", "charging case"),
        ("on my commute", "at the gym", "on long flights", "for work calls"),
    ),
    Category(
        (("blender", False), ("personal blender", False), ("immersion blender", False)),
        ("motor", "jar", "lid", "blades", "noise level", "speed settings"),
        ("for smoothies", "for soups", "for crushing ice", "every morning"),
    ),
    Category(
        (("running shoes", True), ("trail runners", True), ("walking shoes", True)),
        ("cushioning", "fit", "arch support", "grip", "laces", "toe box", "sizing"),
        ("on my morning runs", "for a half marathon", "on trails", "at work all day"),
    ),
    Category(
        (("novel", False), ("mystery novel", False), ("fantasy book", False), ("paperback", False)),
        ("plot", "ending", "characters", "pacing", "writing", "dialogue", "cover"),
        ("on vacation", "before bed", "for my book club", "on the train"),
    ),
    Category(
        (("tent", False), ("2-person tent", False), ("backpacking tent", False)),
        ("rain fly", "zippers", "poles", "floor", "setup", "ventilation", "stakes"),
        ("on a camping trip", "in the rain", "at a music festival", "for backpacking"),
    ),
    Category(
        (("phone case", False), ("silicone case", False), ("wallet case", False)),
        ("grip", "buttons", "camera cutout", "edges", "color", "card slot"),
        ("every day", "at work", "with wireless charging"),
    ),
    Category(
        (("coffee maker", False), ("espresso machine", False), ("drip coffee maker", False),
         ("French press", False)),
        ("carafe", "brew time", "water tank", "filter", "temperature", "timer", "milk frother"),
        ("every morning", "for the office", "on weekends"),
    ),
    Category(
        (("desk chair", False), ("office chair", False), ("gaming chair", False)),
        ("lumbar support", "armrests", "seat cushion", "wheels", "height adjustment", "backrest",
         "assembly"),
        ("for long work days", "in my home office", "for gaming"),
    ),
    Category(
        (("robot vacuum", False), ("cordless vacuum", False), ("handheld vacuum", False)),
        ("suction", "battery", "dustbin", "brush roll", "app", "filter"),
        ("on carpet", "for pet hair", "every other day", "in a small apartment"),
    ),
    Category(
        (("water bottle", False), ("insulated tumbler", False)),
        ("lid", "insulation", "straw", "seal", "paint", "handle"),
        ("at the gym", "on hikes", "at my desk", "in the car"),
    ),
    Category(
        (("backpack", False), ("laptop backpack", False), ("hiking daypack", False)),
        ("straps", "zippers", "pockets", "laptop sleeve", "stitching", "fabric"),
        ("for school", "for travel", "on day hikes", "on my commute"),
    ),
    Category(
        (("mechanical keyboard", False), ("wireless keyboard", False)),
        ("keys", "switches", "backlight", "battery", "layout", "software"),
        ("for coding", "for gaming", "at the office"),
    ),
    Category(
        (("desk lamp", False), ("floor lamp", False), ("LED strip lights", True)),
        ("brightness", "switch", "base", "cord", "color temperature", "remote"),
        ("in my office", "for reading", "in the bedroom"),
    ),
    Category(
        (("air fryer", False),),
        ("basket", "timer", "temperature control", "nonstick coating", "preheat time", "display"),
        ("for frozen fries", "for chicken wings", "most nights", "for reheating pizza"),
    ),
    Category(
        (("yoga mat", False), ("exercise mat", False)),
        ("grip", "thickness", "smell", "carrying strap", "surface"),
        ("for hot yoga", "for home workouts", "for pilates"),
    ),
    Category(
        (("smartwatch", False), ("fitness tracker", False)),
        ("battery life", "heart rate sensor", "screen", "strap", "app", "step counter"),
        ("for running", "for sleep tracking", "every day"),
    ),
    Category(
        (("board game", False), ("card game", False), ("jigsaw puzzle", False)),
        ("rules", "pieces", "box", "replay value", "artwork", "instructions"),
        ("on family game night", "with friends", "with the kids"),
    ),
    Category(
        (("nonstick pan", False), ("cast iron skillet", False), ("saucepan", False)),
        ("coating", "handle", "heat distribution", "lid", "weight"),
        ("for eggs", "every day", "on an induction stove"),
    ),
    Category(
        (("USB-C charger", False), ("power bank", False), ("charging cable", False)),
        ("cable", "charging speed", "capacity", "plug", "connector"),
        ("for my laptop", "when traveling", "for my phone"),
    ),
    Category(
        (("rain jacket", False), ("winter coat", False), ("fleece hoodie", False)),
        ("zipper", "hood", "pockets", "sizing", "insulation", "material"),
        ("in the rain", "on cold mornings", "for hiking", "every day"),
    ),
    Category(
        (("bed sheets", True), ("memory foam pillow", False), ("weighted blanket", False)),
        ("fabric", "fit", "stitching", "softness", "color"),
        ("every night", "in the guest room", "in summer"),
    ),
    Category(
        (("monitor", False), ("portable monitor", False), ("webcam", False)),
        ("screen", "colors", "stand", "ports", "picture quality", "speakers"),
        ("for work", "for gaming", "for video calls"),
    ),
    Category(
        (("dog toy", False), ("dog bed", False), ("cat tree", False)),
        ("stitching", "squeaker", "fabric", "size", "base"),
        ("for my dog", "for our puppy", "for my cat"),
    ),
    Category(
        (("electric kettle", False), ("toaster", False)),
        ("lid", "handle", "boil time", "auto shut-off", "cord", "buttons"),
        ("every morning", "for tea", "at the office"),
    ),
    Category(
        (("sunscreen", False), ("face moisturizer", False), ("shampoo", False)),
        ("scent", "texture", "packaging", "pump", "formula"),
        ("every day", "at the beach", "after workouts"),
    ),
)

WHO = (("my wife", "she"), ("my husband", "he"), ("my son", "he"), ("my daughter", "she"),
       ("my dad", "he"), ("my mom", "she"), ("my roommate", "they"), ("my sister", "she"),
       ("my brother", "he"), ("a coworker", "they"), ("my partner", "they"),
       ("my grandma", "she"))
DURATIONS = ("a day", "two days", "three days", "a week", "two weeks", "three weeks",
             "a month", "six weeks", "two months", "three months", "a few uses")
LONG_DURATIONS = ("a month", "two months", "three months", "six months", "almost a year",
                  "a year", "two years")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
COLORS = ("black", "white", "navy", "gray", "red", "green", "blue", "beige", "pink", "olive")
POS_ADJ = ("great", "excellent", "amazing", "fantastic", "solid", "perfect", "awesome",
           "impressive", "top notch", "superb", "wonderful", "good", "nice", "outstanding")
NEG_ADJ = ("terrible", "awful", "flimsy", "cheap", "poor", "disappointing", "horrible",
           "useless", "bad", "weak", "mediocre", "garbage", "frustrating", "pathetic")
INTENS = ("really", "very", "super", "extremely", "so", "incredibly", "pretty")
POS_EMOJI = ("😍", "👍", "🔥", "😊", "❤️", "💯", "🙌")
NEG_EMOJI = ("😡", "👎", "🤬", "😞", "💩", "😤")
NEUTRAL_EMOJI = ("🤷", "📦", "🙂", "😐")

# Templates. Slots: {this} ("this blender" / "these earbuds"), {It}/{it} ("It"/"They"),
# {obj} ("it"/"them"), {is}/{was}/{has} (agreeing verbs), {s} ("s" for singular verbs),
# {p} product name, {f}/{f2} features, {use}, {who}, {dur}, {ldur}, {pa}/{pa2} positive
# adjectives, {na}/{na2} negative adjectives, {int} intensifier, {n} small number, {day},
# {color}.
POSITIVE = (
    "Love {this}!",
    "Love {this}, {it} work{s} perfectly {use}.",
    "{It} work{s} perfectly {use}.",
    "The {f} {fis} {pa}.",
    "The {f} {fis} {int} {pa}.",
    "Great {p} for the price.",
    "Exactly what I needed.",
    "Highly recommend.",
    "Would buy again.",
    "Five stars, no complaints.",
    "Bought {obj} for {who} and {who_pron} {who_loves} {obj}.",
    "Been using {obj} {use} for {ldur} and {it} still work{s} like new.",
    "Honestly {int} {pa}.",
    "Not bad at all, the {f} {fis} {pa}.",
    "Better than expected.",
    "The {f} exceeded my expectations.",
    "Super happy with this purchase.",
    "Worth every penny.",
    "Easy to set up and the {f} {fis} {pa}.",
    "Best {p} I have owned.",
    "I was skeptical but {it} {is} {pa}.",
    "Can't complain, the {f} {fis} {pa}.",
    "Quality feels {pa} and the {f} {fis} even better.",
    "Already recommended {obj} to {who}.",
    "{It} {is} {int} comfortable and the {f} {fis} {pa}.",
    "My second one, still love {obj}.",
    "Use {obj} {use} and {it} never let{s} me down.",
    "Fantastic value, the {f} alone {fis} worth it.",
    "Really impressed with the {f}.",
    "No issues whatsoever after {ldur}.",
    "Great quality, fast shipping, happy customer.",
    "The {f} {fis} not perfect but overall {it} {is} {pa}.",
)
NEGATIVE = (
    "{It} broke after {dur}.",
    "The {f} stopped working after {dur}.",
    "Terrible {p}.",
    "Don't waste your money.",
    "Total waste of money.",
    "Very disappointed with the {f}.",
    "The {f} {fis} {na}.",
    "The {f} {fis} {int} {na}.",
    "Returned {obj} the next day.",
    "Worst {p} I have ever owned.",
    "Cheaply made and the {f} feel{fs} {na}.",
    "Not worth it.",
    "I wanted to like {obj} but the {f} {fis} {na}.",
    "Customer service was useless.",
    "Would not recommend.",
    "Arrived damaged and nobody answered my emails.",
    "{It} {is} not good at all.",
    "The {f} fell apart after {dur}.",
    "Save your money and buy something else.",
    "Complete junk.",
    "Stopped working after {dur}, what a joke.",
    "Useless {use}, the {f} {fis} a disaster.",
    "Had high hopes but the {f} {fis} {na}.",
    "Sent {obj} back, the {f} {fwas} broken out of the box.",
    "Not impressed, the {f} {fis} {na} and {it} feel{s} cheap.",
    "I regret buying {this}.",
    "Smells weird and the {f} {fis} {na}.",
    "Misleading photos, the {f} look{fs} nothing like the listing.",
    "Don't buy {this}, the {f} failed within {dur}.",
    "Two stars because the {f} {fis} {na}.",
    "Annoying {f} and poor build quality.",
)
SARCASTIC = (
    "Oh great, {it} broke after {dur}. Just perfect.",
    "Wow, what a fantastic {p}... if you like {f} that stop{fs} working after {dur}.",
    "Love how the {f} stopped working the day after the return window closed.",
    "Five stars for teaching me patience, zero for the {f}.",
    "Sure, {it} work{s}. For about {dur}.",
    "Amazing, another {p} that lasted {dur}. Truly a masterpiece of engineering.",
    "Great if you like {f} that fall{fs} off every time you touch {obj}.",
    "Best paperweight I ever bought.",
)
MIXED = (
    "The {f} {fis} {pa} but the {f2} {f2is} {na}.",
    "{Pa} {f}, {na} {f2}.",
    "Love the {f}, hate the {f2}.",
    "Good {p} overall, although the {f2} could be better.",
    "Not great, not terrible.",
    "Decent for the price but the {f2} {f2is} {na}.",
    "{It} work{s} well {use}, but the {f2} broke after {ldur}.",
    "The {f} {fis} {pa}. The {f2}, not so much.",
    "Mixed feelings: {pa} {f} but {na} {f2}.",
    "Pretty good, but I expected more from the {f2}.",
    "Would be five stars if the {f2} were not so {na}.",
    "Nice {f}, but customer service was slow when the {f2} failed.",
    "{It} {is} fine, though the {f2} {f2is} a little {na}.",
    "The {f} {fis} okay and the {f2} {f2is} {na}, so three stars.",
)
NEUTRAL = (
    "It is a {p}.",
    "Ordered the {color} one.",
    "Arrived on {day}.",
    "Arrived on {day} in a plain box.",
    "Bought {obj} to use {use}.",
    "Used {obj} {n} times so far.",
    "Haven't used {obj} much yet.",
    "Second one I have bought.",
    "Replaced my old {p}.",
    "{It} {is} {color}.",
    "Shipping took {n} days.",
    "Will update after a few more weeks.",
    "Using {obj} {use}.",
    "Came with a short manual.",
    "Does what it says.",
    "The {f} {fis} as described.",
    "{It} {is} smaller than I thought.",
    "Bought {obj} for {who}.",
    "Size runs as listed.",
    "Same as the one in the store.",
    "Color is a bit darker than the photos.",
    "Came in {n} boxes.",
    "Ordered on {day}, arrived {n} days later.",
    "The {f} take{fs} a while to get used to.",
    "It is what it is.",
    "Standard {p}.",
    "Nothing much to say about the {f}.",
    "Have had {obj} for {ldur} now.",
    "Bought {obj} on sale.",
    "No instructions were included for the {f}.",
)
VERY_SHORT = (
    ("Meh.", "neutral"), ("Fine.", "neutral"), ("OK", "neutral"), ("ok.", "neutral"),
    ("It's okay.", "neutral"), ("Average.", "neutral"), ("As expected.", "neutral"),
    ("Love it!", "positive"), ("Perfect.", "positive"), ("Great!!", "positive"),
    ("A+++", "positive"), ("👍", "positive"), ("Nice.", "positive"),
    ("Junk.", "negative"), ("Broken.", "negative"), ("Nope.", "negative"),
    ("Awful.", "negative"), ("👎👎", "negative"), ("Meh", "neutral"), ("Works.", "neutral"),
)
BLANK_TEXTS = ("", " ", "   ", "\t", "  ", "N/A", "n/a", "N/A", "-", "   ")

OPENERS = (
    "", "", "", "", "", "", "Update: ", "Honestly, ", "Okay so ", "First impressions: ",
    "After {ldur}: ", "Bought this to use {use}. ", "Ordered the {color} one. ",
)
POS_CLOSERS = ("", "", "", "", "Highly recommend!", "Would buy again.", "Thanks!",
               "5/5.", "Very happy.")
NEG_CLOSERS = ("", "", "", "", "Avoid.", "Returning it.", "One star.", "Very disappointed.",
               "Never again.")

LONG_INTROS = (
    "I have been using {this} {use} for {ldur}, so here is a longer review.",
    "It arrived on {day} in a plain box and I have used {obj} {use} ever since.",
    "I did a lot of research before buying {this}, so I want to share some details.",
    "Long review, because the short ones did not answer my questions.",
)
LONG_POS = (
    "The {f} {fis} {pa}, and the {f2} {f2is} even better than the reviews said.",
    "I use {obj} {use} and {it} {has} held up perfectly.",
    "Setup took about ten minutes and the instructions were clear.",
    "{who} tried {obj} last weekend and immediately ordered one too.",
    "For the price, I honestly do not think you can do better.",
    "Customer support answered my one question within an hour, which was a nice surprise.",
    "The packaging was minimal and everything arrived in perfect shape.",
    "After {ldur} of daily use there is not a single scratch on {obj}, which I love.",
    "My old {p} lasted barely a year, so this feels like a real upgrade.",
    "The {f} in particular {fis} {int} {pa} and makes a noticeable difference {use}.",
    "I even bought a second one as a gift for {who}, who was thrilled.",
)
LONG_NEG = (
    "The photos made the {f} look {pa}, but in person {it} feel{s} cheap.",
    "Unfortunately the {f2} started acting up after {dur} and it only got worse from there.",
    "I contacted support twice and got the same copy-pasted answer both times.",
    "By the end of the month the {f} {fwas} basically useless {use}.",
    "I ended up going back to my old {p}, which is five years old and still works better.",
    "The refund process was slow and I had to pay for return shipping myself.",
    "For what it costs, this should not feel this cheap.",
    "The {f2} makes an awful rattling noise that gets worse every day.",
    "I tried every fix suggested online and nothing helped at all.",
    "{who} warned me about this brand and I should have listened.",
    "Honestly I feel ripped off and disappointed by the whole experience.",
)
LONG_NEUTRAL = (
    "The {f} work{fs} the way the listing describes, and the {f2} {f2is} about what you would"
    " expect.",
    "I ordered the {color} version, which is slightly darker than in the pictures.",
    "There is nothing special about the design, it looks like most others in this price range.",
    "Compared to my previous one, the {f} {fis} a bit different and took a few days to get used"
    " to.",
    "It took about {n} days to arrive, which matched the estimate on the listing.",
    "The box included the {p}, a short manual and a small bag of spare parts.",
    "I mostly use {obj} {use}, so I cannot say much about other situations.",
    "The size and weight are about what the product page says.",
    "{who} has the previous model, and the two are very similar in daily use.",
    "The price was in the middle of the range when I bought {obj}.",
)
LONG_OUTROS = {
    "positive": ("Overall a wonderful purchase and easily five stars from me.",
                 "If you are on the fence, just get {obj}, you will not regret it."),
    "negative": ("I am giving it two stars only because the {f} {fwas} decent for the first week.",
                 "Save yourself the headache and buy a better {p} from a different brand."),
    "mixed": ("So three stars: good in some ways, frustrating in others.",
              "I would buy {obj} again, but only on sale and with lower expectations."),
    "neutral": ("I will update this review if anything changes.",
                "That is everything I can say so far."),
}

# Stars given the intended sentiment: weights for 1..5 stars.
STAR_WEIGHTS = {
    "positive": (1, 1, 4, 24, 70),
    "negative": (58, 25, 11, 4, 2),
    "sarcastic": (70, 22, 6, 1, 1),
    "mixed": (6, 22, 42, 24, 6),
    "neutral": (5, 10, 35, 30, 20),
    "blank": (20, 10, 20, 20, 30),
}
INTENT_WEIGHTS = {"positive": 41, "negative": 24, "sarcastic": 3, "mixed": 13, "neutral": 19}

KEYBOARD_NEIGHBOURS = {"a": "s", "e": "r", "i": "o", "o": "p", "t": "y", "n": "m", "s": "d",
                       "r": "t", "l": "k", "u": "y", "h": "j", "c": "v"}


def _is_plural(feature: str) -> bool:
    """'zippers' is plural, 'bass' and 'brightness' are not."""
    return feature.endswith("s") and not feature.endswith("ss")


def _slots(rng: random.Random, cat: Category, product: str, plural: bool) -> dict[str, str]:
    f, f2 = rng.sample(cat.features, 2)
    pa, pa2 = rng.sample(POS_ADJ, 2)
    who, pron = rng.choice(WHO)
    return {
        "_features": "|".join(cat.features),
        "this": ("these " if plural else "this ") + product,
        "It": "They" if plural else "It",
        "it": "they" if plural else "it",
        "obj": "them" if plural else "it",
        "is": "are" if plural else "is",
        "was": "were" if plural else "was",
        "has": "have" if plural else "has",
        "s": "" if plural else "s",
        "p": product,
        "f": f,
        "f2": f2,
        "fis": "are" if _is_plural(f) else "is",
        "f2is": "are" if _is_plural(f2) else "is",
        "fwas": "were" if _is_plural(f) else "was",
        "fs": "" if _is_plural(f) else "s",
        "use": rng.choice(cat.uses),
        "who": who,
        "who_pron": pron,
        "who_loves": "love" if pron == "they" else "loves",
        "dur": rng.choice(DURATIONS),
        "ldur": rng.choice(LONG_DURATIONS),
        "pa": pa,
        "pa2": pa2,
        "Pa": pa[0].upper() + pa[1:],
        "na": rng.choice(NEG_ADJ),
        "int": rng.choice(INTENS),
        "n": str(rng.randint(2, 12)),
        "day": rng.choice(DAYS),
        "color": rng.choice(COLORS),
    }


def _vary(rng: random.Random, slots: dict[str, str]) -> dict[str, str]:
    """Fresh adjectives, and sometimes a different main feature, for the next sentence."""
    out = dict(slots)
    out["pa"] = rng.choice(POS_ADJ)
    out["Pa"] = out["pa"][0].upper() + out["pa"][1:]
    out["na"] = rng.choice(NEG_ADJ)
    out["int"] = rng.choice(INTENS)
    if rng.random() < 0.6:
        f = rng.choice([x for x in slots["_features"].split("|") if x != slots["f2"]])
        out["f"] = f
        out["fis"] = "are" if _is_plural(f) else "is"
        out["fwas"] = "were" if _is_plural(f) else "was"
        out["fs"] = "" if _is_plural(f) else "s"
    return out


def _fill(template: str, slots: dict[str, str]) -> str:
    text = template.format(**slots)
    # "{who} tried ..." at the start of a sentence.
    return text[0].upper() + text[1:] if text else text


def _typo(rng: random.Random, text: str) -> str:
    """Introduce one or two plausible typing mistakes."""
    for _ in range(rng.randint(1, 2)):
        positions = [i for i, ch in enumerate(text) if ch.isalpha()]
        if len(positions) < 4:
            return text
        i = rng.choice(positions[1:-1])
        kind = rng.randrange(4)
        if kind == 0 and text[i + 1].isalpha():  # swap with next letter
            text = text[:i] + text[i + 1] + text[i] + text[i + 2:]
        elif kind == 1:  # drop a letter
            text = text[:i] + text[i + 1:]
        elif kind == 2:  # double a letter
            text = text[:i] + text[i] + text[i:]
        else:  # hit the neighbouring key
            text = text[:i] + KEYBOARD_NEIGHBOURS.get(text[i], text[i]) + text[i + 1:]
    return text


def _style(rng: random.Random, text: str, intent: str) -> str:
    """Apply surface noise: emoji, shouting, lower case, typos, exclamation marks."""
    r = rng.random()
    if r < 0.04:
        text = text.upper()
    elif r < 0.12:
        text = text.lower().rstrip(".")
    if rng.random() < 0.08:
        pool = {"positive": POS_EMOJI, "negative": NEG_EMOJI, "sarcastic": NEG_EMOJI,
                "mixed": NEUTRAL_EMOJI, "neutral": NEUTRAL_EMOJI}[intent]
        text = f"{text} {rng.choice(pool)}"
    if intent in ("positive", "negative") and rng.random() < 0.07:
        text = text.rstrip(".!") + "!!!"
    if rng.random() < 0.06:
        text = _typo(rng, text)
    return text


def _short_review(rng: random.Random, intent: str, slots: dict[str, str]) -> str:
    if intent == "sarcastic":
        return _fill(rng.choice(SARCASTIC), slots)
    pool = {"positive": POSITIVE, "negative": NEGATIVE, "mixed": MIXED, "neutral": NEUTRAL}[intent]
    if intent == "neutral":
        k = rng.choices((1, 2, 3), weights=(50, 40, 10))[0]
    else:
        k = rng.choices((1, 2, 3), weights=(30, 45, 25))[0]
    templates = rng.sample(pool, k)
    sentences = [_fill(templates[0], slots)]
    sentences += [_fill(t, _vary(rng, slots)) for t in templates[1:]]
    if intent == "mixed" and rng.random() < 0.4:
        extra = POSITIVE if rng.random() < 0.5 else NEGATIVE
        sentences.append(_fill(rng.choice(extra), _vary(rng, slots)))
    opener = _fill(rng.choice(OPENERS), slots) if rng.random() < 0.5 else ""
    closer = ""
    if intent == "positive":
        closer = rng.choice(POS_CLOSERS)
    elif intent == "negative":
        closer = rng.choice(NEG_CLOSERS)
    body = " ".join(sentences)
    if opener.endswith(", ") or opener.endswith("so "):  # "Honestly, the lid is great."
        if not body.startswith(("I ", "I'")):
            body = body[0].lower() + body[1:]
    return (opener + body + " " + closer).strip()


def _long_review(rng: random.Random, intent: str, slots: dict[str, str]) -> str:
    """About 150 words: an intro, a body in the intended tone, and a closing sentence."""
    if intent == "neutral":
        body = rng.sample(LONG_NEUTRAL, 8)
    elif intent == "mixed":
        body = rng.sample(LONG_NEUTRAL, 2) + rng.sample(LONG_POS, 4) + rng.sample(LONG_NEG, 4)
    else:
        own = LONG_POS if intent == "positive" else LONG_NEG
        body = rng.sample(LONG_NEUTRAL, 2) + rng.sample(own, 7)
        rng.shuffle(body)
    sentences = [rng.choice(LONG_INTROS)] + body + [rng.choice(LONG_OUTROS[intent])]
    return " ".join(_fill(t, _vary(rng, slots) if i else slots) for i, t in enumerate(sentences))


def _word_count(text: str) -> int:
    return len(text.split())


def generate(seed: int = SEED, n: int = N_REVIEWS) -> list[tuple[int, str, str, int]]:
    """Return ``n`` rows of ``(review_id, product, text, stars)``, deterministic in ``seed``."""
    rng = random.Random(seed)
    intents = list(INTENT_WEIGHTS)
    intent_weights = list(INTENT_WEIGHTS.values())
    n_blank = len(BLANK_TEXTS)
    n_long = 24
    n_very_short = 60
    rows: list[tuple[str, str, int]] = []  # (product, text, stars)

    def stars_for(intent: str) -> int:
        if rng.random() < 0.03:  # people click the wrong star
            return rng.randint(1, 5)
        return rng.choices((1, 2, 3, 4, 5), weights=STAR_WEIGHTS[intent])[0]

    def pick_product() -> tuple[Category, str, bool]:
        cat = rng.choice(CATEGORIES)
        product, plural = rng.choice(cat.products)
        return cat, product, plural

    for text in BLANK_TEXTS:
        _, product, _ = pick_product()
        rows.append((product, text, stars_for("blank")))
    for _ in range(n_long):
        cat, product, plural = pick_product()
        intent = rng.choice(("positive", "negative", "mixed", "neutral"))
        rows.append((product, _long_review(rng, intent, _slots(rng, cat, product, plural)),
                     stars_for(intent)))
    for _ in range(n_very_short):
        _, product, _ = pick_product()
        text, intent = rng.choice(VERY_SHORT)
        rows.append((product, text, stars_for(intent)))
    seen: dict[str, int] = {}
    while len(rows) < n:
        cat, product, plural = pick_product()
        intent = rng.choices(intents, weights=intent_weights)[0]
        text = _style(rng, _short_review(rng, intent, _slots(rng, cat, product, plural)), intent)
        if not 5 <= _word_count(text) <= 40:
            continue
        # Real data repeats itself a little ("Highly recommend."), but not much.
        if seen.get(text, 0) >= 2:
            continue
        seen[text] = seen.get(text, 0) + 1
        rows.append((product, text, stars_for(intent)))

    rng.shuffle(rows)
    # Make sure a small head (load_reviews(100)) still shows a blank review or two.
    blank_positions = [i for i, (_, text, _) in enumerate(rows) if not text.strip()]
    for target, i in zip((17, 63), blank_positions[:2]):
        rows[target], rows[i] = rows[i], rows[target]
    return [(i + 1, product, text, stars) for i, (product, text, stars) in enumerate(rows)]


def to_csv_bytes(rows: list[tuple[int, str, str, int]]) -> bytes:
    """The rows as CSV bytes with a header, the same on every platform."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    """Gzip ``data`` with a fixed header (mtime 0, no file name, OS 'unknown')."""
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x02\xff"  # xfl=2: max compression
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
    body = compressor.compress(data) + compressor.flush()
    trailer = struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
    return header + body + trailer


def main(argv: list[str] | None = None) -> None:
    """Write the dataset (``--out PATH``, default the shipped file)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the gzipped CSV (default: {DEFAULT_OUT})")
    parser.add_argument("--plain", action="store_true",
                        help="write uncompressed CSV instead (for eyeballing)")
    args = parser.parse_args(argv)
    data = to_csv_bytes(generate())
    args.out.write_bytes(data if args.plain else gzip_bytes(data))
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
