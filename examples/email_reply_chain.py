"""A LangChain chain that personalizes an email reply: ``prompt | ChatCoSteer |
StrOutputParser``, streamed. The user's past emails steer the reply from the device; the
cloud model sees only the incoming email and the instruction.

    python examples/email_reply_chain.py [--max-new-tokens 80]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.memory.transfer import read_jsonl
from langchain_costeer import ChatCoSteer, Private

HERE = Path(__file__).resolve().parent
INCOMING = (
    "From: Dana (events committee)\n"
    "Hi Sam, we're organising the office summer picnic on Friday afternoon. "
    "Could you help set up the tables from 2pm? Let me know!"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=Path, default=HERE / "data" / "sam_emails.jsonl")
    parser.add_argument("--cloud", default=DEFAULT_CLOUD)
    parser.add_argument("--local", default=DEFAULT_LOCAL)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args()
    past_emails = [row["text"] for _, row in read_jsonl(args.history)]

    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You write short, friendly email replies."),
            ("human", "Reply to this email for me:\n\n{email}"),
        ]
    )
    model = ChatCoSteer(model=args.cloud, local_model=args.local, max_tokens=args.max_new_tokens)
    chain = prompt | model | StrOutputParser()

    print("Cloud only (no personal context):\n")
    for piece in chain.stream({"email": INCOMING}):
        print(piece, end="", flush=True)
    print(f"\n\nCoSteer, steered by {len(past_emails)} past emails kept on the device:\n")
    personal = {"configurable": {"context": Private(past_emails)}}  # kept out of traces
    pieces = 0
    for piece in chain.stream({"email": INCOMING}, config=personal):
        print(piece, end="", flush=True)
        pieces += 1
    print(f"\n\n({pieces} streamed pieces)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
