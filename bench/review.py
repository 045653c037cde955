"""Review page at scale: the queue page's work (filter, order, one page of 50, render) with
1,000 and 10,000 queued candidates, against 10 in the same run; prints the ratios.

    bench/review [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from pipeline.review.queue import Filters, ReviewQueue
from pipeline.review.web import PAGE_SIZE, TEMPLATES


def _queue(n: int) -> ReviewQueue:
    rng = random.Random(n)
    queue = ReviewQueue()
    for i in range(n):
        queue.add_candidate(
            {
                "candidate_id": f"k{i}",
                "case_id": f"c{i}",
                "loop": rng.choice(["refunds", "kyc-review", "support-triage"]),
                "ts": 1_795_000_000_000 + i,
                "reasons": rng.sample(["failed_eval", "escalated", "novel_category"], 2),
                "priority": rng.random(),
                "category": rng.choice(["late", "damaged", "chargeback", "crypto"]),
                "input_text": f"request {i} about an order that went wrong",
                "resolver": "SYSTEM",
                "outcome": "FAILED",
            }
        )
    return queue


def _page_seconds(queue: ReviewQueue, repeat: int) -> float:
    template = TEMPLATES.get_template("queue.html")
    started = time.perf_counter()
    for i in range(repeat):
        filters = Filters(loop="refunds" if i % 2 else None)
        pending = queue.pending(filters, "ana", 1_795_000_000_000)
        context: dict[str, Any] = {
            "reviewer": "ana",
            "rows": pending[:PAGE_SIZE],
            "total": len(pending),
            "page": 1,
            "pages": 1,
            "filters": filters,
            "facets": queue.facets(),
            "ready": True,
            "query": {},
        }
        template.render(context)
    return (time.perf_counter() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    base = _page_seconds(_queue(10), args.repeat)
    result: dict[str, Any] = {"baseline_10_ms": round(base * 1000, 3)}
    for n in (1_000, 10_000):
        seconds = _page_seconds(_queue(n), args.repeat)
        result[f"queue_{n}_ms"] = round(seconds * 1000, 3)
        result[f"ratio_{n}"] = round(seconds / base, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
