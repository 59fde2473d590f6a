"""Write the project's own small example data (the offline default), deterministically.

Usage: python data/example/generate.py   (rewrites the .jsonl files beside this script)

- sentiment_{train,validation}.jsonl: short, made-up financial news sentences about fictional
  companies, labelled positive / negative / neutral from an investor's point of view
  (same fields as Financial PhraseBank: sentence, label).
- instruction_{train,validation}.jsonl: small instruction / input / output tasks whose answers
  are computed here, so they are correct by construction (same fields as Alpaca).
- preference_{train,validation}.jsonl: prompt / chosen / rejected pairs on the same kind of
  tasks: the computed answer is chosen; the rejected one is computed wrong on purpose or evasive.
- chat_{train,validation}.jsonl: OpenAI-style `messages` conversations of one to four exchanges on
  the same tasks, some with a system prompt, with follow-up questions about the previous answer
  (answers computed here too).
Every sentence and instruction is written by this project; no external data is used.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(20261123)

COMPANIES = ["Nordvik Paper", "Aurora Telecom", "Kestrel Steel", "Halden Foods", "Brightwater Energy",
             "Lumo Software", "Saimaa Logistics", "Polar Retail", "Vireo Pharma", "Tundra Mining",
             "Baltic Shipyards", "Fjord Insurance", "Oakline Bank", "Merila Chemicals", "Solvik Media",
             "Granite Construction", "Helio Solar", "Pinewood Furniture", "Cobalt Networks", "Riverstone Hotels"]
CITIES = ["Helsinki", "Tampere", "Oulu", "Stockholm", "Tallinn", "Riga", "Gdansk", "Oslo", "Turku", "Espoo"]
SEGMENTS = ["packaging", "mobile", "engineering", "consumer", "wholesale", "services", "cloud", "export"]
PRODUCTS = ["paper machines", "network equipment", "frozen foods", "wind turbines", "office furniture",
            "steel pipes", "software licences", "medical devices"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def fill(t: str) -> str:
    a = round(rng.uniform(5, 400), 1)
    return t.format(
        co=rng.choice(COMPANIES), client=rng.choice(COMPANIES), city=rng.choice(CITIES),
        seg=rng.choice(SEGMENTS), prod=rng.choice(PRODUCTS), month=rng.choice(MONTHS),
        year=rng.randint(2005, 2012), q=rng.randint(1, 4), p=round(rng.uniform(2, 45), 1),
        a=a, hi=round(a * rng.uniform(1.1, 1.9), 1), lo=round(a * rng.uniform(0.4, 0.9), 1),
        n=rng.randint(12, 900), k=rng.randint(2, 40),
    )


POSITIVE = [
    "{co} reported net sales of EUR {hi} mn for the quarter , up from EUR {a} mn a year earlier .",
    "Operating profit at {co} rose to EUR {hi} million from EUR {a} million .",
    "{co} won an order worth EUR {a} million from {client} .",
    "Shares in {co} climbed {p} % after the company raised its full-year outlook .",
    "{co} said its {seg} sales grew by {p} % in the {q}. quarter of {year} .",
    "{co} expects net sales to increase clearly in {year} .",
    "The board of {co} proposes a dividend increase to EUR 0.{k} per share .",
    "{co} turned to a profit of EUR {a} mn in {year} after a loss a year before .",
    "Order intake at {co} improved by {p} % year-on-year .",
    "{co} signed a {k}-year supply deal for {prod} with {client} , boosting its order book .",
    "Earnings per share at {co} increased to EUR 0.{k} from EUR 0.0{q} .",
    "{co} beat analysts ' forecasts with a {p} % rise in quarterly profit .",
]
NEGATIVE = [
    "{co} reported net sales of EUR {lo} mn , down from EUR {a} mn a year earlier .",
    "Operating profit at {co} fell to EUR {lo} million from EUR {a} million .",
    "{co} will cut {n} jobs at its {city} plant .",
    "Shares in {co} dropped {p} % after the company issued a profit warning .",
    "{co} swung to an operating loss of EUR {a} mn in the {q}. quarter .",
    "{co} lowered its outlook and now expects {year} sales to decline .",
    "Demand for {prod} weakened , and {co} 's order intake decreased by {p} % .",
    "{co} said it will close its {city} factory , affecting {n} employees .",
    "The credit rating of {co} was downgraded after its debt rose to EUR {hi} mn .",
    "{co} cancelled its dividend after a loss of EUR {a} million .",
]
NEUTRAL = [
    "{co} is headquartered in {city} .",
    "{co} will publish its interim report for the {q}. quarter on {month} {k} .",
    "The company employs about {n} people in {city} .",
    "{co} supplies {prod} to customers in {k} countries .",
    "The agreement with {client} was signed in {month} {year} .",
    "{co} operates in the {seg} business and has units in {city} and {client} 's home market .",
    "The annual general meeting of {co} will be held in {city} in {month} .",
    "{co} appointed a new chief financial officer , who will start in {month} .",
    "{co} 's {seg} division makes {prod} for industrial customers .",
    "The transaction is expected to be completed during the {q}. quarter of {year} .",
    "{co} has {k} production plants , located in {city} and abroad .",
    "The shares of {co} are listed on the exchange in {city} .",
    "{co} will present its strategy to investors in {city} on {month} {k} .",
    "Financial details of the deal between {co} and {client} were not disclosed .",
]


def sentiment(n_train: int = 240, n_val: int = 60) -> None:
    share = {"neutral": 0.55, "positive": 0.28, "negative": 0.17}
    pools = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
    rows, seen = [], set()
    for label, frac in share.items():
        target = round(frac * (n_train + n_val))
        got = 0
        while got < target:
            s = fill(rng.choice(pools[label]))
            if s.lower() not in seen:
                seen.add(s.lower())
                rows.append({"sentence": s, "label": label})
                got += 1
    rng.shuffle(rows)
    write("sentiment_train.jsonl", rows[:n_train])
    write("sentiment_validation.jsonl", rows[n_train:n_train + n_val])


WORDS = ["river", "market", "silver", "garden", "window", "rocket", "pencil", "thunder", "harbor", "lantern",
         "meadow", "copper", "falcon", "velvet", "orchard", "glacier", "compass", "ember", "summit", "willow"]
CAPITALS = {"Finland": "Helsinki", "Sweden": "Stockholm", "Norway": "Oslo", "Estonia": "Tallinn",
            "Latvia": "Riga", "Poland": "Warsaw", "Germany": "Berlin", "France": "Paris", "Spain": "Madrid",
            "Italy": "Rome", "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima"}


def instruction_row() -> dict:
    kind = rng.randrange(7)
    if kind == 0:
        ws = rng.sample(WORDS, rng.randint(3, 6))
        return {"instruction": "Sort these words alphabetically.", "input": ", ".join(ws),
                "output": ", ".join(sorted(ws))}
    if kind == 1:
        xs = [rng.randint(1, 99) for _ in range(rng.randint(2, 5))]
        return {"instruction": "Add up the numbers.", "input": " + ".join(map(str, xs)), "output": str(sum(xs))}
    if kind == 2:
        ws = rng.sample(WORDS, rng.randint(2, 5))
        return {"instruction": "Write the words in upper case.", "input": " ".join(ws), "output": " ".join(ws).upper()}
    if kind == 3:
        country = rng.choice(sorted(CAPITALS))
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {CAPITALS[country]}."}
    if kind == 4:
        c = rng.randint(-20, 40)
        return {"instruction": "Convert the temperature from Celsius to Fahrenheit.", "input": f"{c} °C",
                "output": f"{c * 9 / 5 + 32:g} °F"}
    if kind == 5:
        ws = rng.sample(WORDS, rng.randint(3, 6))
        return {"instruction": "How many words are in the text?", "input": " ".join(ws), "output": str(len(ws))}
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return {"instruction": "Reverse the order of the words.", "input": " ".join(ws), "output": " ".join(ws[::-1])}


def instructions(n_train: int = 120, n_val: int = 30) -> None:
    rows, seen = [], set()
    while len(rows) < n_train + n_val:
        r = instruction_row()
        k = (r["instruction"].lower(), r["input"].lower())
        if k not in seen:
            seen.add(k)
            rows.append(r)
    write("instruction_train.jsonl", rows[:n_train])
    write("instruction_validation.jsonl", rows[n_train:])


EVASIVE = ["I'm not sure, you could look that up yourself.", "That is not something I can help with.",
           "Sorry, I cannot answer that.", "Why do you want to know?", "I would rather not say."]


def worse_answer(r: dict) -> str:
    """A wrong answer to an instruction row: computed wrong on purpose, or an evasive reply."""
    if rng.random() < 0.5:
        return rng.choice(EVASIVE)
    out, inp = r["output"], r["input"]
    if r["instruction"].startswith("Add up") or r["instruction"].startswith("How many"):
        return str(int(out) + rng.choice([-3, -2, -1, 1, 2, 5]))
    if r["instruction"].startswith("What is the capital"):
        country = r["instruction"].removeprefix("What is the capital of ").rstrip("?")
        other = rng.choice(sorted(c for k, c in CAPITALS.items() if k != country))
        return f"The capital of {country} is {other}."
    if "Celsius" in r["instruction"]:
        c = float(inp.split()[0])
        return f"{c + 32:g} °F"
    if "upper case" in r["instruction"]:
        return inp.lower()
    words = out.replace(",", "").split()
    wrong = words[:]
    while wrong == words:  # another order of the same words
        rng.shuffle(wrong)
    return (", " if "," in out else " ").join(wrong)


def preferences(n_train: int = 120, n_val: int = 40) -> None:
    """prompt / chosen / rejected pairs: the computed answer is chosen, a wrong or evasive one rejected."""
    rows, seen = [], set()
    while len(rows) < n_train + n_val:
        r = instruction_row()
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        if prompt.lower() not in seen:
            seen.add(prompt.lower())
            rows.append({"prompt": prompt, "chosen": r["output"], "rejected": worse_answer(r)})
    write("preference_train.jsonl", rows[:n_train])
    write("preference_validation.jsonl", rows[n_train:])


SYSTEMS = ["You are a careful assistant. Answer with the result only.",
           "You are a helpful assistant for small text and number tasks. Keep answers short."]


def follow_up(r: dict) -> tuple[str, str] | None:
    """A question about the answer just given, and its computed answer (None: no follow-up for this kind)."""
    out, ins = r["output"], r["instruction"]
    if ins.startswith("Add up"):
        k = rng.randint(2, 9)
        return f"And if you subtract {k} from that?", str(int(out) - k)
    if ins.startswith("How many words"):
        return "Is that an even number?", "Yes." if int(out) % 2 == 0 else "No."
    if ins.startswith("Sort these words"):
        return "Now write them in reverse alphabetical order.", ", ".join(sorted(out.split(", "), reverse=True))
    if ins.startswith("Write the words in upper case"):
        return "And in lower case?", out.lower()
    if ins.startswith("Reverse the order"):
        return "How many words is that?", str(len(out.split()))
    return None


def conversation() -> dict:
    """One to three tasks in a row, each maybe followed by a question about its answer."""
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        r = instruction_row()
        ask = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": r["output"]}]
        more = follow_up(r)
        if more and rng.random() < 0.6:
            messages += [{"role": "user", "content": more[0]}, {"role": "assistant", "content": more[1]}]
    return {"messages": messages}


def chats(n_train: int = 120, n_val: int = 40) -> None:
    rows, seen = [], set()
    while len(rows) < n_train + n_val:
        c = conversation()
        k = tuple(m["content"].lower() for m in c["messages"] if m["role"] != "assistant")
        if k not in seen:
            seen.add(k)
            rows.append(c)
    write("chat_train.jsonl", rows[:n_train])
    write("chat_validation.jsonl", rows[n_train:])


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(name, len(rows))


if __name__ == "__main__":
    sentiment()
    instructions()
    preferences()
    chats()  # last: the files above stay as they were
