"""``python -m examples.invoices add TEXT`` / ``get ID`` / ``list``.

Reads ``KEYVAULT_URL`` and ``KEYVAULT_TOKEN`` (an API client with generate and unwrap on the
KEK, e.g. ``manage.py api client create invoices --kek invoices-kek --ops generate,unwrap``),
``INVOICES_KEK`` (default ``invoices-kek``) and ``INVOICES_DB`` (default ``invoices.sqlite3``).
"""

from __future__ import annotations

import argparse
import os

from examples.invoices.store import InvoiceStore
from keyvault_client import DataKeyCache, KeyvaultClient

CONTEXT = {"app": "invoices"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.invoices")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("add").add_argument("text")
    sub.add_parser("get").add_argument("id", type=int)
    sub.add_parser("list")
    args = parser.parse_args(argv)
    client = KeyvaultClient(os.environ["KEYVAULT_URL"], os.environ["KEYVAULT_TOKEN"], cache=DataKeyCache())
    store = InvoiceStore(os.environ.get("INVOICES_DB", "invoices.sqlite3"), client,
                         kek=os.environ.get("INVOICES_KEK", "invoices-kek"), context=CONTEXT)
    try:
        if args.command == "add":
            print(store.add(args.text))
        elif args.command == "get":
            print(store.get(args.id))
        else:
            for row_id, text in store.all().items():
                print(f"{row_id}\t{text}")
    finally:
        store.close()
        client.close()


if __name__ == "__main__":
    main()
