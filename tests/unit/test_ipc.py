"""Child-to-master messages: what goes on the wire and what the master makes of a line."""

from __future__ import annotations

import json
import os

from jobqd.daemon.ipc import Booted, Receiver, Sender, Status, decode, encode


def test_encode_leaves_out_unset_fields():
    assert json.loads(encode(Booted("maintenance", 7))) == {
        "kind": "booted",
        "role": "maintenance",
        "process_id": 7,
    }
    assert json.loads(encode(Status())) == {"kind": "status"}
    assert json.loads(encode(Status(busy=2, concurrency=8, metrics={}))) == {
        "kind": "status",
        "busy": 2,
        "concurrency": 8,
        "metrics": {},
    }


def test_decode_round_trips_and_ignores_what_it_does_not_know():
    for message in (Booted("worker", 3, "emails"), Status(leader=False, metrics={"m": []})):
        assert decode(json.loads(encode(message))) == message
    assert decode({"kind": "hello"}) is None
    assert decode({"kind": "status", "busy": "2", "leader": 1, "metrics": []}) == Status()


def test_receiver_keeps_whole_json_objects_only():
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    receiver = Receiver(read_fd)
    Sender(write_fd).send(Status(busy=1))
    os.write(write_fd, b'not json\n[1, 2]\n{"kind": "boo')
    documents, still_open = receiver.read()
    assert documents == [{"kind": "status", "busy": 1}] and still_open
    os.write(write_fd, b'ted", "role": "http"}\n')
    assert [decode(d) for d in receiver.read()[0]] == [Booted("http")]
    os.close(write_fd)
    assert receiver.read() == ([], False)
    os.close(read_fd)
