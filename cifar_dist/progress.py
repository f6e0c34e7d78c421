"""Progress of a long loop outside training (evaluate, predict, ensemble): a tqdm bar on a terminal, a
plain line at each quarter otherwise (logs, pipes), nothing when not shown (ranks other than 0)."""
from __future__ import annotations

import sys


def progress(items, total: int, what: str, shown: bool = True):
    """Yield items, reporting how many of total are done."""
    if not shown or total <= 0:
        yield from items
        return
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:  # plain lines, as elsewhere
            pass
        else:
            yield from tqdm(items, total=total, desc=what, file=sys.stderr, dynamic_ncols=True, leave=False)
            return
    quarters = {max(1, round(total * q / 4)) for q in range(1, 5)}
    for done, item in enumerate(items, start=1):
        yield item
        if done in quarters:
            print(f"{what}: {done}/{total} batches", file=sys.stderr, flush=True)
