#!/usr/bin/env python
"""WikiText-2 test perplexity as recipes/RESULTS.md reports it: 12 non-overlapping windows of 512 tokens.

    python recipes/wikitext_ppl.py ../shared/data/wikitext-2/test.txt MODEL_DIR [MODEL_DIR ...]

The first 12 x 512 + 1 tokens of the file, tokenized without special tokens, scored by
`convert.eval.perplexity.score_text_file`.
"""

import sys
import time

from convert.eval.perplexity import score_text_file

WINDOW, WINDOWS = 512, 12

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    test_file = sys.argv[1]
    for folder in sys.argv[2:]:
        started = time.time()
        result = score_text_file(folder, test_file, WINDOW, WINDOWS)
        print(
            f"{folder}\tppl {result.ppl:.3f}\ttokens {result.tokens}\twindows {result.windows}"
            f"\t{time.time() - started:.0f}s",
            flush=True,
        )
