"""The simple baselines next to ``model train``'s figures in docs/learning.md: TF-IDF with naive Bayes
and with logistic regression (scikit-learn), on exactly the split ``model train`` makes.

The split is ``model.training.stratified_split`` with the same held-out share and seed over the same
examples (empty texts skipped, as ``model train`` skips them), so both are scored on the same messages.

    python tests/data/spamassassin_baseline.py spamassassin.jsonl
"""

from __future__ import annotations

import argparse

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_fscore_support
from sklearn.naive_bayes import MultinomialNB

from filter_worker.model.training import stratified_split
from filter_worker.tools.evaluation import load_training_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    examples, _ = load_training_examples(args.data, "text", "label")
    train, held = stratified_split([e.label for e in examples], args.held_out, args.seed)
    texts, labels = [e.text for e in examples], [e.label for e in examples]
    vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2)
    x_train = vectorizer.fit_transform([texts[i] for i in train])
    x_held = vectorizer.transform([texts[i] for i in held])
    y_train, y_held = [labels[i] for i in train], [labels[i] for i in held]
    for name, model in (
        ("TF-IDF + multinomial naive Bayes", MultinomialNB()),
        ("TF-IDF + logistic regression", LogisticRegression(max_iter=2000, class_weight="balanced")),
    ):
        predicted = model.fit(x_train, y_train).predict(x_held)
        names = sorted(set(y_held))
        p, r, f, s = precision_recall_fscore_support(y_held, predicted, labels=names, zero_division=0)
        print(name)
        for i, label in enumerate(names):
            print(f"  {label:6} precision {p[i]:.3f} recall {r[i]:.3f} f1 {f[i]:.3f} support {s[i]}")


if __name__ == "__main__":
    main()
