"""Draw movie-review openings that no earlier file holds, for benchmarks on prompts nobody has tuned on.

An opening is the first four words of a Rotten Tomatoes snippet of ten words or longer, as in movie_prompts.txt
(see README.md here for the source: `movieReviewSnippets_GroundTruth.txt` in the vaderSentiment 3.3.2 sdist).
Snippets are visited in a seeded random order and an opening is kept unless an excluded file or an earlier
draw already holds it, so frequent openings stay as likely as in the first file, minus the ones already used.

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 && tar xzf vaderSentiment-3.3.2.tar.gz
    tar xzf vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz
    python examples/data/draw_openings.py hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt \
        --exclude examples/data/movie_prompts.txt --count 256 --seed 1 > examples/data/fresh_prompts.txt
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable
from pathlib import Path

OPENING_WORDS = 4
MIN_SNIPPET_WORDS = 10


def draw_openings(snippets: Iterable[str], exclude: Iterable[str], count: int, seed: int) -> list[str]:
    """`count` distinct openings of randomly ordered `snippets`, none of them in `exclude`."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    long_enough = [s.split() for s in snippets if len(s.split()) >= MIN_SNIPPET_WORDS]
    random.Random(seed).shuffle(long_enough)
    seen, drawn = set(exclude), []
    for words in long_enough:
        opening = " ".join(words[:OPENING_WORDS])
        if opening not in seen:
            seen.add(opening)
            drawn.append(opening)
            if len(drawn) == count:
                return drawn
    raise ValueError(f"count={count}: only {len(drawn)} new openings in {len(long_enough)} snippets")


def read_snippets(path: Path) -> list[str]:
    """The text column of the tab-separated ground-truth file (id, mean human rating, text)."""
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [row[2] for row in rows if len(row) >= 3]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snippets", type=Path, help="movieReviewSnippets_GroundTruth.txt")
    parser.add_argument("--exclude", type=Path, nargs="*", default=[], help="files of openings not to draw again")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    exclude = [line for path in args.exclude for line in path.read_text().splitlines()]
    print("\n".join(draw_openings(read_snippets(args.snippets), exclude, args.count, args.seed)))


if __name__ == "__main__":
    main()
