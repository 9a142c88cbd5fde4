"""The baseline: MTG's freesound client used as its documentation shows.

For each sound, `get_sound(id)` then `sound.retrieve(dir)`; optionally `time.sleep(60 / rate)`
after every file (the naive throttle). Run by bench/run.py against the fake server.
"""
from __future__ import annotations

import argparse
import time

import freesound


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ids", nargs="*", type=int, default=[])
    parser.add_argument("--query")
    parser.add_argument("--sleep-after", type=float, default=0.0)
    args = parser.parse_args()

    freesound.URIS.BASE = args.api
    client = freesound.FreesoundClient()
    client.set_token(args.token, "oauth")
    ids = list(args.ids)
    if args.query is not None:
        pager = client.text_search(query=args.query, page_size=150, fields="id")
        while True:
            ids += [result["id"] for result in pager.results]
            if not pager.next:
                break
            pager = pager.next_page()
    for sound_id in ids:
        sound = client.get_sound(sound_id)
        sound.retrieve(args.out, name=f"{sound_id}.bin")
        if args.sleep_after:
            time.sleep(args.sleep_after)


if __name__ == "__main__":
    main()
