#!/usr/bin/env python3
"""A slixmpp client driven by the Rust integration tests (tests/cases/xmpp.rs).

Connects to a Stoa node's c2s listener (logging in with --password over SASL --mech: PLAIN by
default, SCRAM-SHA-256 or SCRAM-SHA-1; or with --anonymous), then reads one JSON command per
line on stdin and writes one JSON event per line on stdout. Commands:

  {"op": "join", "room": JID, "nick": N, "maxstanzas": K?, "password": P?, "timeout": S? (default 20)}
      -> {"event": "joined", "room", "nick", "status": [codes], "occupants": [nicks],
          "subject", "history": [{"nick","body","stanza_id","origin_id","delay"}]}
      or {"event": "join_error", "room", "condition", "text"} (condition "timeout" when unanswered)
  {"op": "send", "room": JID, "body": B, "origin_id": O?}       (nothing; the reflection comes as "groupchat")
  {"op": "raw", "xml": "<message .../>"}                           (sent as it is)
  {"op": "leave", "room": JID, "nick": N}
  {"op": "iq", "to": JID?, "type": "get", "xml": "<query xmlns='…'/>", "timeout": S? (default 10)}
      -> {"event": "iq_result", "xml"} or {"event": "iq_error", "condition", "text"}
  {"op": "ping", "to": JID}            -> {"event": "pong"} or {"event": "iq_error", ...}
  {"op": "mam", "room": JID, "max": N?, "after": ID?, "before": ID?, "start": ISO?, "with": JID?}
      -> {"event": "mam", "results": [{"id","body","nick","delay"}], "complete", "first", "last", "count"}
  {"op": "quit"}

Events also arrive unasked: "groupchat" (a live message: room, nick, body, stanza_id, origin_id,
occupant_id, delay), "presence" (room, nick, type, status codes), "message_error",
"disconnected". The first line is {"event": "session_start", "jid"} or {"event": "failed_auth"}.
"""
import argparse
import asyncio
import json
import sys
from datetime import datetime

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout, PresenceError
from slixmpp.xmlstream import ET

NS_SID = "urn:xmpp:sid:0"
NS_OCC = "urn:xmpp:occupant-id:0"
NS_DELAY = "urn:xmpp:delay"
NS_MUC_USER = "http://jabber.org/protocol/muc#user"


def out(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def child_attr(stanza, name, ns, attr):
    el = stanza.xml.find("{%s}%s" % (ns, name))
    return None if el is None else el.get(attr)


def message_event(msg):
    return {
        "room": str(msg["from"].bare),
        "nick": msg["from"].resource,
        "body": msg["body"],
        "stanza_id": child_attr(msg, "stanza-id", NS_SID, "id"),
        "origin_id": child_attr(msg, "origin-id", NS_SID, "id"),
        "occupant_id": child_attr(msg, "occupant-id", NS_OCC, "id"),
        "delay": msg.xml.find("{%s}delay" % NS_DELAY) is not None,
    }


def status_codes(stanza):
    x = stanza.xml.find("{%s}x" % NS_MUC_USER)
    if x is None:
        return []
    return sorted(int(s.get("code")) for s in x.findall("{%s}status" % NS_MUC_USER))


class Client(slixmpp.ClientXMPP):
    def __init__(self, jid, password, anonymous, mech):
        super().__init__(jid, password, sasl_mech="ANONYMOUS" if anonymous else mech)
        # PLAIN and SCRAM without TLS: the tests run on loopback, where the node offers them.
        self.plugin["feature_mechanisms"].config["unencrypted_plain"] = True
        self.plugin["feature_mechanisms"].config["unencrypted_scram"] = True
        for plugin in ["xep_0030", "xep_0045", "xep_0059", "xep_0198", "xep_0199", "xep_0313", "xep_0359", "xep_0421"]:
            self.register_plugin(plugin)
        self.joining = set()
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("failed_auth", lambda _: out(event="failed_auth"))
        self.add_event_handler("sm_enabled", lambda _: out(event="sm_enabled"))
        self.add_event_handler("disconnected", lambda _: out(event="disconnected"))
        self.add_event_handler("groupchat_message", self.on_groupchat)
        self.add_event_handler("message_error", lambda m: out(event="message_error", condition=m["error"]["condition"], text=m["error"]["text"]))
        self.add_event_handler("groupchat_presence", self.on_presence)
        self.add_event_handler("stream_error", lambda e: out(event="stream_error", condition=e["condition"], text=e["text"], see_other_host=e["see_other_host"]))

    async def on_start(self, _):
        out(event="session_start", jid=str(self.boundjid))
        # Keep a reference: asyncio holds tasks weakly, and a collected task stops reading.
        self.command_task = asyncio.ensure_future(self.commands())

    def on_groupchat(self, msg):
        if msg["body"] and str(msg["from"].bare) not in self.joining:
            out(event="groupchat", **message_event(msg))

    def on_presence(self, pres):
        room = str(pres["from"].bare)
        if room in self.joining:
            return
        out(event="presence", room=room, nick=pres["from"].resource, type=pres["type"], status=status_codes(pres))

    async def commands(self):
        loop = asyncio.get_event_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                break
            try:
                await getattr(self, "op_" + op)(cmd)
            except Exception as e:  # report, keep going: the test decides
                out(event="exception", op=op, text=repr(e))
        self.disconnect()

    async def op_join(self, cmd):
        room = cmd["room"]
        self.joining.add(room)
        try:
            pres, subject, occupants, history = await self.plugin["xep_0045"].join_muc_wait(
                slixmpp.JID(room), cmd["nick"], password=cmd.get("password"), maxstanzas=cmd.get("maxstanzas"), timeout=cmd.get("timeout", 20)
            )
            out(
                event="joined",
                room=room,
                nick=pres["from"].resource,
                status=status_codes(pres),
                occupants=sorted(p["from"].resource for p in occupants),
                subject=subject["subject"],
                history=[message_event(m) for m in history],
            )
        except PresenceError as e:
            out(event="join_error", room=room, condition=e.presence["error"]["condition"], text=e.presence["error"]["text"])
        except asyncio.TimeoutError:
            out(event="join_error", room=room, condition="timeout", text="no answer to the join")
        finally:
            self.joining.discard(room)

    async def op_send(self, cmd):
        msg = self.make_message(mto=cmd["room"], mbody=cmd["body"], mtype="groupchat")
        if cmd.get("origin_id"):
            msg.xml.append(ET.fromstring("<origin-id xmlns='%s' id='%s'/>" % (NS_SID, cmd["origin_id"])))
        msg.send()

    async def op_raw(self, cmd):
        self.send_raw(cmd["xml"])

    async def op_leave(self, cmd):
        self.plugin["xep_0045"].leave_muc(slixmpp.JID(cmd["room"]), cmd["nick"])

    async def op_iq(self, cmd):
        iq = self.make_iq(ito=cmd.get("to"), itype=cmd.get("type", "get"))
        iq.append(ET.fromstring(cmd["xml"]))
        try:
            result = await iq.send(timeout=cmd.get("timeout", 10))
            out(event="iq_result", xml=str(result))
        except IqError as e:
            out(event="iq_error", condition=e.iq["error"]["condition"], text=e.iq["error"]["text"])
        except IqTimeout:
            out(event="iq_timeout")

    async def op_mam(self, cmd):
        rsm = {}
        for key in ("max", "after", "before"):
            if key in cmd:
                rsm[key] = cmd[key]
        start = datetime.fromisoformat(cmd["start"]) if "start" in cmd else None
        with_jid = slixmpp.JID(cmd["with"]) if "with" in cmd else None
        try:
            iq = await self.plugin["xep_0313"].retrieve(jid=slixmpp.JID(cmd["room"]), start=start, with_jid=with_jid, rsm=rsm, timeout=10)
        except IqError as e:
            out(event="iq_error", condition=e.iq["error"]["condition"], text=e.iq["error"]["text"])
            return
        results = []
        for m in iq["mam"]["results"]:
            inner = m["mam_result"]["forwarded"]["stanza"]
            results.append({"id": m["mam_result"]["id"], "body": inner["body"], "nick": inner["from"].resource,
                            "delay": m["mam_result"]["forwarded"].xml.find("{%s}delay" % NS_DELAY) is not None})
        fin = iq["mam_fin"]
        complete = fin.xml.get("complete") in ("true", "1")
        count = int(fin["rsm"]["count"]) if fin["rsm"]["count"] != "" else None
        out(event="mam", results=results, complete=complete, first=fin["rsm"]["first"], last=fin["rsm"]["last"], count=count)

    async def op_ping(self, cmd):
        try:
            await self.plugin["xep_0199"].send_ping(cmd["to"], timeout=10)
            out(event="pong")
        except IqError as e:
            out(event="iq_error", condition=e.iq["error"]["condition"], text=e.iq["error"]["text"])
        except IqTimeout:
            out(event="iq_timeout")


def main():
    import logging, os
    if os.environ.get("STOA_XMPP_CLIENT_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="client.py %(levelname)s %(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("--jid", required=True)
    p.add_argument("--password", default="")
    p.add_argument("--anonymous", action="store_true")
    p.add_argument("--mech", default="PLAIN", help="SASL mechanism of a password login: PLAIN, SCRAM-SHA-256, SCRAM-SHA-1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    c = Client(a.jid, a.password, a.anonymous, a.mech)
    # Plaintext on loopback (the node offers PLAIN there); TLS tests pass a CA instead.
    c.enable_starttls = False
    c.enable_direct_tls = False
    c.enable_plaintext = True
    c.connect(host=a.host, port=a.port)
    asyncio.get_event_loop().run_until_complete(c.disconnected)


if __name__ == "__main__":
    main()
