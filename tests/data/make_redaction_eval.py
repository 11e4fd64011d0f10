"""Builds redaction_eval.jsonl: the labelled set `make bench-redaction` scores the analyzer on.

Run `python tests/data/make_redaction_eval.py` to regenerate (seeded, so the
output is stable for a given Faker version). Texts are marked up as
``[[TYPE|value]]``; the markup is removed and the offsets kept.
Generated texts come from Faker (several locales); the hard cases at the end
are hand-written: entities against punctuation, lower-case names,
international phone formats, card numbers and IBANs with spaces, secrets in
code, and texts with no PII that look as if they had some.
"""

from __future__ import annotations

import base64
import json
import random
import re
import string
from pathlib import Path

from faker import Faker

OUT = Path(__file__).with_name("redaction_eval.jsonl")
SEED = 20261129
GENERATED = 340

# Real places: spaCy small knows these; Faker's invented town names are not places to it or anyone.
PLACES = [
    "Berlin",
    "Paris",
    "Madrid",
    "Lisbon",
    "Amsterdam",
    "Chicago",
    "Seattle",
    "Boston",
    "Toronto",
    "Vancouver",
    "Sydney",
    "Melbourne",
    "Tokyo",
    "Osaka",
    "Mumbai",
    "Delhi",
    "Nairobi",
    "Lagos",
    "Cairo",
    "Dublin",
    "Edinburgh",
    "Manchester",
    "London",
    "New York",
    "San Francisco",
    "Los Angeles",
    "Texas",
    "California",
    "Florida",
    "Germany",
    "France",
    "Spain",
    "Italy",
    "Canada",
    "Mexico",
    "Brazil",
    "Argentina",
    "Japan",
    "India",
    "Kenya",
    "Norway",
    "Sweden",
    "Denmark",
    "Poland",
    "Vienna",
    "Prague",
    "Zurich",
    "Geneva",
    "Munich",
    "Hamburg",
    "Rome",
    "Milan",
    "Athens",
]
FILLER = [
    "Can you summarize the attached report in three bullet points?",
    "The quarterly numbers look better than last year.",
    "Please keep the answer short and friendly.",
    "Order 48213 shipped with 3 items on the second pallet.",
    "We upgraded the service to version 2.14.1 last night.",
    "The meeting moved to the big room on the fourth floor.",
    "Thanks again for the quick turnaround on this.",
    "Let me know if anything else is needed from our side.",
    "The build failed twice, then passed after a retry.",
    "Our budget for the pilot is 12000 dollars in total.",
    "Write the reply in a formal tone.",
    "The ticket has been open for 9 days now.",
]


def secret_token(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def jwt(rng: random.Random) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    header, claims = part({"alg": "HS256", "typ": "JWT"}), part({"sub": str(rng.randint(1, 10**6))})
    return f"{header}.{claims}.{secret_token(rng, 43)}"


def private_key(rng: random.Random) -> str:
    body = "\n".join(secret_token(rng, 64, string.ascii_letters + string.digits + "+/") for _ in range(4))
    return f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"


def phone(fake: dict[str, Faker], rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.5:
        return rng.choice(
            ["({a}) {b}-{c}", "{a}-{b}-{c}", "{a}.{b}.{c}", "+1 {a} {b} {c}", "1-{a}-{b}-{c}"]
        ).format(
            a=rng.choice(["212", "415", "312", "617", "206", "303"]),
            b=f"{rng.randint(200, 999)}",
            c=f"{rng.randint(0, 9999):04d}",
        )
    if choice < 0.75:
        return fake["en_GB"].phone_number()
    return rng.choice(
        ["+49 30 {a} {b}", "+33 1 {a} {b}", "+34 91 {c} {d} {e}", "+91 98{a} {b}", "+81 3 {a} {b}"]
    ).format(
        a=rng.randint(1000, 9999),
        b=rng.randint(1000, 9999),
        c=rng.randint(100, 999),
        d=rng.randint(10, 99),
        e=rng.randint(10, 99),
    )


def ssn(rng: random.Random) -> str:
    area = rng.choice([n for n in range(1, 900) if n != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def card(fake: dict[str, Faker], rng: random.Random) -> str:
    number = fake["en_US"].credit_card_number(
        card_type=rng.choice(["visa16", "mastercard", "amex", "discover"])
    )
    if rng.random() < 0.3 and len(number) == 16:
        return " ".join(number[i : i + 4] for i in range(0, 16, 4))
    return number


SLOTS = {
    "PERSON": [
        "My name is {v}.",
        "Please forward this to {v} before Friday.",
        "{v} will join the call tomorrow.",
        "I spoke with {v} yesterday about the invoice.",
        "Dear {v}, thank you for your letter.",
        "The contract was signed by {v} and the board.",
        "Ask {v} whether the slides are ready.",
    ],
    "LOCATION": [
        "I live in {v}.",
        "We are opening an office in {v} next year.",
        "Ship it to our warehouse in {v}.",
        "The conference takes place in {v} this spring.",
        "She moved to {v} after university.",
    ],
    "EMAIL_ADDRESS": ["Contact me at {v}.", "My email is {v}", "cc: {v}, thanks", "Send the file to <{v}>."],
    "PHONE_NUMBER": [
        "Call me on {v}.",
        "My number is {v}",
        "Phone: {v}",
        "You can reach the front desk at {v} today.",
    ],
    "US_SSN": ["My SSN is {v}.", "Social security number: {v}", "SSN {v} is on the form."],
    "CREDIT_CARD": ["Charge card {v} please.", "My credit card number is {v}", "Card: {v}, expiry next May."],
    "IP_ADDRESS": [
        "The server at {v} is down.",
        "Login from IP {v} was blocked",
        "Ping {v} and report back.",
    ],
    "IBAN_CODE": ["Wire it to IBAN {v}.", "Account: {v}", "Refund to {v} please."],
    "API_KEY": ["Use key {v} for the API.", "OPENAI_API_KEY={v}", "my token is {v} do not share"],
    "AWS_ACCESS_KEY": ["aws_access_key_id = {v}", "The access key {v} leaked in the logs."],
    "BEARER_TOKEN": ["curl -H 'Authorization: Bearer {v}' https://api.example.com/v1/items"],
    "JWT": ["token={v}", "The session cookie holds {v} right now."],
    "PRIVATE_KEY": ["Here is the key:\n{v}\nkeep it safe."],
}


def value(kind: str, fake: dict[str, Faker], rng: random.Random) -> str:
    locale = rng.choice(["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT"])
    if kind == "PERSON":
        return f"{fake[locale].first_name()} {fake[locale].last_name()}"
    if kind == "LOCATION":
        return rng.choice(PLACES)
    if kind == "EMAIL_ADDRESS":
        return fake[locale].email()
    if kind == "PHONE_NUMBER":
        return phone(fake, rng)
    if kind == "US_SSN":
        return ssn(rng)
    if kind == "CREDIT_CARD":
        return card(fake, rng)
    if kind == "IP_ADDRESS":
        return fake["en_US"].ipv4_public() if rng.random() < 0.8 else fake["en_US"].ipv6()
    if kind == "IBAN_CODE":
        return fake[rng.choice(["de_DE", "fr_FR", "nl_NL", "es_ES", "en_GB"])].iban()
    if kind == "API_KEY":
        return "sk-" + rng.choice(["", "proj-", "live-"]) + secret_token(rng, rng.randint(24, 48))
    if kind == "AWS_ACCESS_KEY":
        return "AKIA" + secret_token(rng, 16, string.ascii_uppercase + string.digits)
    if kind == "BEARER_TOKEN":
        return secret_token(rng, 40, string.ascii_letters + string.digits + "-_")
    if kind == "JWT":
        return jwt(rng)
    return private_key(rng)


# Hand-written hard cases. Offsets come from the markup.
HARD = [
    "Email [[EMAIL_ADDRESS|ana.souza@example.com.br]], or call [[PHONE_NUMBER|+55 11 98765 4321]].",
    "([[PERSON|Maria Garcia]]) signed; see [[EMAIL_ADDRESS|m.garcia@example.org]]!",
    "ask [[PERSON|john smith]] about it, he knows.",
    "Card number:[[CREDIT_CARD|4111 1111 1111 1111]]; exp 12/29.",
    "Numbers: [[PHONE_NUMBER|+44 20 7946 0958]], [[PHONE_NUMBER|+49 30 901820]], "
    "[[PHONE_NUMBER|+33 1 42 68 53 00]].",
    "IBAN:[[IBAN_CODE|DE89 3704 0044 0532 0130 00]].",
    "IBAN [[IBAN_CODE|GB29NWBK60161331926819]], BIC NWBKGB2L.",
    "ssn=[[US_SSN|219-09-9999]]",
    "Server [[IP_ADDRESS|192.168.10.24]]:8080 refused the connection.",
    "IPv6 [[IP_ADDRESS|2001:db8:85a3::8a2e:370:7334]] is the gateway.",
    '{"user": "[[EMAIL_ADDRESS|li.wei@example.cn]]", "phone": "[[PHONE_NUMBER|(415) 555-0132]]"}',
    "export AWS_ACCESS_KEY_ID=[[AWS_ACCESS_KEY|AKIAIOSFODNN7EXAMPLE]]",
    "headers = {'Authorization': 'Bearer [[BEARER_TOKEN|x9f8Q2mN4vT7kL1pZ3rY6wB5]]'}",
    'client = OpenAI(api_key="[[API_KEY|sk-proj-4fG7hJ2kL9mN3pQ8rS1tV6wX]]")',
    "Dr. [[PERSON|Aisha Bello]] will see you in [[LOCATION|Lagos]].",
    "Flying from [[LOCATION|Toronto]] to [[LOCATION|Mexico]] with [[PERSON|Carlos Mendes]].",
    "[[PERSON|Olga Ivanova]]'s card is [[CREDIT_CARD|5500-0000-0000-0004]].",
    "Reach [[PERSON|Kenji Watanabe]] at [[EMAIL_ADDRESS|kenji@example.jp]] "
    "or [[PHONE_NUMBER|+81 3 1234 5678]].",
    "my ip is [[IP_ADDRESS|8.8.4.4]], my ssn [[US_SSN|078-05-1120]].",
    "Payment from [[IBAN_CODE|FR1420041010050500013M02606]] failed.",
    "Use [[JWT|eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U]] to test.",
    "-----[[PRIVATE_KEY|-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----]]-----",
    "Tell [[PERSON|Priya Sharma]] that [[PERSON|Tom Becker]] called from [[LOCATION|Munich]].",
    "The order ships to [[LOCATION|Dublin]] on Monday; call [[PHONE_NUMBER|+353 1 555 0147]] if late.",
    "Visa [[CREDIT_CARD|4012888888881881]] was declined.",
    "Amex [[CREDIT_CARD|3782 822463 10005]] on file.",
    "Her address is [[EMAIL_ADDRESS|o'brien.k@example.ie]].",
    "SSN: [[US_SSN|123-45-6789]] (test).",
    "Forward it to [[PERSON|Sven Olsen]], [[PERSON|Ingrid Berg]] and [[PERSON|Lars Nilsson]].",
    "We met [[PERSON|Fatima Zahra]] in [[LOCATION|Cairo]].",
    # Look like PII but are not.
    "Version 10.2.3.4 of the library fixes the bug.",
    "The product code is 4111-ABCD and the order 2024-0001.",
    "Call the function with sk as the first argument.",
    "The ratio was 3.14159 over 2718 samples.",
    "Monday at 10:30 works for the standup.",
    "Use the bearer method described in section 4.",
    "The Python class is named ApiKeyStore.",
    "Temperature 21.5 degrees, humidity 40 percent.",
    "Please translate this paragraph into Spanish.",
    "Room 404 is on floor 4 of building 12.",
]

MARK = re.compile(r"\[\[([A-Z_]+)\|(.*?)\]\]", re.DOTALL)


def unmark(text: str, source: str) -> dict[str, object]:
    out, entities, cursor = [], [], 0
    for m in MARK.finditer(text):
        out.append(text[cursor : m.start()])
        start = sum(map(len, out))
        out.append(m.group(2))
        entities.append({"type": m.group(1), "start": start, "end": start + len(m.group(2))})
        cursor = m.end()
    out.append(text[cursor:])
    return {"text": "".join(out), "entities": entities, "source": source}


def generated(rng: random.Random, fake: dict[str, Faker]) -> list[str]:
    kinds = list(SLOTS)
    texts = []
    for i in range(GENERATED):
        picked = [kinds[i % len(kinds)], *rng.sample(kinds, rng.randint(0, 2))]
        sentences = [rng.choice(SLOTS[k]).format(v=f"[[{k}|{value(k, fake, rng)}]]") for k in picked]
        sentences += rng.sample(FILLER, rng.randint(0, 2))
        rng.shuffle(sentences)
        texts.append(" ".join(sentences))
    return texts


def main() -> None:
    rng = random.Random(SEED)
    fake = {loc: Faker(loc) for loc in ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL"]}
    for i, f in enumerate(fake.values()):
        f.seed_instance(SEED + i)
    rows = [unmark(t, "generated") for t in generated(rng, fake)] + [unmark(t, "hand") for t in HARD]
    with OUT.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} texts to {OUT}")


if __name__ == "__main__":
    main()
