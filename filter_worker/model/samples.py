"""Built-in multilingual sample messages.

The demo, the benchmark and the offline test models all need text that looks like chat traffic:
mostly short messages in many languages, a few long ones, and a share of hostile ones so that every
routing action shows up. Keeping the corpus in code (not a data file) means it ships with the wheel
and needs no network.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

# (language, tone, text). Tones are what a human would say; the model decides for itself.
_SHORT: tuple[tuple[str, str, str], ...] = (
    ("en", "friendly", "Thanks so much, this made my day!"),
    ("en", "friendly", "Great job on the release, team."),
    ("en", "neutral", "Meeting moved to 3pm, same room."),
    ("en", "neutral", "Can you send me the invoice for October?"),
    ("en", "negative", "This update broke everything again, really annoying."),
    ("en", "hostile", "You are a worthless idiot and everyone hates you."),
    ("en", "hostile", "Shut up, nobody wants your garbage opinions, loser."),
    ("en", "spam", "CLICK HERE to win a FREE iPhone!!! Limited offer, act now!!!"),
    ("de", "friendly", "Vielen Dank, das ist wirklich großartig!"),
    ("de", "neutral", "Das Paket kommt morgen zwischen 10 und 12 Uhr."),
    ("de", "negative", "Der Service war langsam und unfreundlich."),
    ("de", "hostile", "Du bist so ein dummer Vollidiot, verschwinde einfach."),
    ("fr", "friendly", "Merci beaucoup, c'est parfait !"),
    ("fr", "neutral", "Le train part à 18h15 du quai numéro 4."),
    ("fr", "negative", "Je suis très déçu par cette commande."),
    ("fr", "hostile", "Tu es vraiment nul, ferme-la et dégage."),
    ("es", "friendly", "¡Me encanta, muchas gracias por todo!"),
    ("es", "neutral", "La reunión es el martes a las nueve."),
    ("es", "negative", "El producto llegó roto y nadie responde."),
    ("es", "hostile", "Eres un inútil asqueroso, nadie te soporta."),
    ("it", "friendly", "Grazie mille, siete fantastici!"),
    ("it", "neutral", "Il negozio apre alle otto domani."),
    ("it", "negative", "Che delusione, non funziona per niente."),
    ("pt", "friendly", "Adorei, obrigado pela ajuda!"),
    ("pt", "neutral", "O voo foi remarcado para sexta-feira."),
    ("pt", "hostile", "Você é um idiota completo, some daqui."),
    ("nl", "friendly", "Heel erg bedankt, super geregeld!"),
    ("nl", "negative", "Slechtste ervaring ooit, nooit meer."),
    ("pl", "friendly", "Dziękuję bardzo, wszystko działa świetnie!"),
    ("pl", "negative", "Bardzo słaba obsługa, jestem rozczarowany."),
    ("ru", "friendly", "Спасибо большое, всё отлично!"),
    ("ru", "neutral", "Встреча перенесена на четверг."),
    ("ru", "hostile", "Ты тупой идиот, заткнись уже."),
    ("uk", "friendly", "Дякую, все чудово працює!"),
    ("tr", "friendly", "Çok teşekkürler, harika olmuş!"),
    ("tr", "negative", "Berbat bir deneyimdi, hiç memnun kalmadım."),
    ("ja", "friendly", "本当にありがとうございます、とても助かりました！"),
    ("ja", "neutral", "会議は明日の午後二時からです。"),
    ("ja", "negative", "この商品は最悪でした。二度と買いません。"),
    ("zh", "friendly", "非常感谢，你们做得太棒了！"),
    ("zh", "neutral", "快递明天上午送到。"),
    ("zh", "hostile", "你这个白痴，闭嘴吧，没人想听你说话。"),
    ("ko", "friendly", "정말 감사합니다, 최고예요!"),
    ("ar", "friendly", "شكرا جزيلا، هذا رائع!"),
    ("ar", "negative", "الخدمة سيئة جدا ولن أعود مرة أخرى."),
    ("hi", "friendly", "बहुत धन्यवाद, यह शानदार है!"),
    ("id", "neutral", "Rapatnya diundur ke hari Senin."),
    ("vi", "friendly", "Cảm ơn bạn rất nhiều, tuyệt vời!"),
)

_LONG_SENTENCES: tuple[str, ...] = (
    "I have been a customer for many years and I wanted to write a longer note about my experience.",
    "The first few orders arrived on time and the support team answered every question politely.",
    "Lately, however, deliveries have been late and the tracking page shows wrong information.",
    "I called twice and was put on hold for more than forty minutes each time.",
    "Honestly I do not know whether I will keep my subscription next year.",
    "Still, the product itself is good and I would like things to go back to how they were.",
    "Please forward this to whoever is responsible for logistics in our region.",
    "Ich möchte außerdem anmerken, dass die Rechnung doppelt abgebucht wurde.",
    "Par ailleurs, le colis était abîmé et l'emballage ouvert.",
)


def _long_message(rng: random.Random) -> str:
    """A multi-sentence message of a few hundred tokens: the long tail of real traffic."""
    return " ".join(rng.choice(_LONG_SENTENCES) for _ in range(rng.randint(4, 14)))


def sample_messages(count: int, seed: int = 7, long_ratio: float = 0.05) -> list[dict[str, str]]:
    """Return ``count`` JSON-ready messages, reproducible for a given seed.

    Most are short chat lines; ``long_ratio`` of them are long, so batching code meets the length
    distribution it will meet in production (a dozen tokens typical, a few hundred occasionally).
    """
    rng = random.Random(seed)
    messages: list[dict[str, str]] = []
    for i in range(count):
        if rng.random() < long_ratio:
            lang, tone, text = "mixed", "long", _long_message(rng)
        else:
            lang, tone, text = rng.choice(_SHORT)
        messages.append({"id": f"m{i}", "lang": lang, "tone": tone, "text": text})
    return messages


def corpus() -> Iterator[str]:
    """Every distinct text, for training an offline tokenizer that covers all scripts used here."""
    for _, _, text in _SHORT:
        yield text
    yield from _LONG_SENTENCES


# Campaign texts for ``message_mix(duplicate_ratio=...)``: what a spam run repeats thousands of times.
_CAMPAIGNS: tuple[str, ...] = (
    "CLICK HERE to win a FREE iPhone!!! Limited offer, act now!!!",
    "Gana dinero rápido desde casa, escríbeme por privado.",
    "Verdiene 5000 Euro pro Woche von zu Hause aus, jetzt klicken!",
    "Crypto giveaway: send 1 BTC and get 2 back, only today.",
    "私のプロフィールをチェックして、限定オファーを受け取ってください！",
)
_NAMES: tuple[str, ...] = ("anna", "li", "omar", "sven", "maria", "kenji", "ola", "dev", "zoe", "yusuf")


def message_mix(count: int, seed: int = 7, long_ratio: float = 0.05, duplicate_ratio: float = 0.0) -> list[str]:
    """``count`` texts with a chat-like length mix, reproducible for a seed; the benchmark's workload.

    Unlike ``sample_messages``, texts are (almost) all distinct, the way real traffic is: each short
    line gets a mention, a number or a second sentence, so a decision cache only helps where
    ``duplicate_ratio`` puts repeats (copies of a few campaign texts, some with changed case or
    spacing, as campaigns vary them). Lengths: most a dozen tokens, ``long_ratio`` a few hundred.
    """
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(count):
        roll = rng.random()
        if roll < duplicate_ratio:
            text = rng.choice(_CAMPAIGNS)
            variant = rng.random()
            if variant < 0.2:
                text = text.upper()
            elif variant < 0.4:
                text = "  " + text.replace(" ", "  ")
        elif roll < duplicate_ratio + long_ratio:
            text = _long_message(rng)
        else:
            _, _, text = rng.choice(_SHORT)
            decoration = rng.random()
            if decoration < 0.3:
                text = f"@{rng.choice(_NAMES)}{rng.randint(1, 999)} {text}"
            elif decoration < 0.6:
                text = f"{text} #{i}"
            else:
                text = f"{text} {rng.choice(_SHORT)[2]}"
        texts.append(text)
    return texts
