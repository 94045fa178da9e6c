"""The status page at ``/``: one pure function from the page document to HTML (every value escaped).

The document is what :mod:`appconnector.statusdata` gathers (plain JSON values). :func:`sections`
renders each part on its own; :func:`page` puts them in one self-contained page (inline CSS and
script, nothing fetched from elsewhere) whose numbers are in the HTML, so it works with JavaScript
off. With JavaScript on, the page fetches ``/status/page`` every few seconds and swaps in the
sections the server rendered again, so there is one renderer, here.

The page on the read-only listener shows cluster health only (no node's names, domains or
addresses). The same page on the admin listener (``admin=True``) adds the lookup box and the
per-node bar list: their script asks the admin endpoints of its own origin with the token typed
into a field, sent as an ``Authorization`` header, never stored in a cookie or a URL.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REFRESH_SECONDS = 5
Doc = Mapping[str, Any]


def esc(v: object) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def ago(then: object, now: float) -> str:
    """'3 s ago', '2 min ago', '—' for no time."""
    if not isinstance(then, (int, float)) or then <= 0:
        return "—"
    d = max(0.0, now - float(then))
    if d < 120:
        return f"{d:.0f} s ago"
    if d < 7200:
        return f"{d / 60:.0f} min ago"
    return f"{d / 3600:.1f} h ago"


def num(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.0f}" if v.is_integer() or v >= 100 else f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return esc(v)


def _ok(ok: object) -> str:
    return '<span class="ok">ok</span>' if ok else '<span class="bad">FAIL</span>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f'<p class="dim">{esc(empty)}</p>'
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


# ---- sections ----------------------------------------------------------------------------------------


def _summary(doc: Doc, now: float) -> str:
    raft = doc.get("raft") or {}
    ready = doc.get("ready")
    leader = raft.get("leader")
    return _kv([
        ("this connector", f'<code id="self">{esc(raft.get("self"))}</code>'),
        ("readiness", '<span class="ok" id="ready">ready</span>' if ready
         else '<span class="bad" id="ready">NOT READY</span>'),
        ("role", f'<span id="role">{esc(raft.get("role"))}</span>'),
        ("leader", f'<code id="leader">{esc(leader) if leader else "none known"}</code>'),
        ("term", f'<span id="term">{num(raft.get("term"))}</span>'),
        ("commit / applied", f'{num(raft.get("commit_index"))} / {num(raft.get("applied_index"))}'),
        ("mode", esc(doc.get("mode"))),
        ("primary subnet router", f'<span id="primary">{esc(doc.get("primary_router"))}</span>'),
    ])


def _members(doc: Doc, now: float) -> str:
    rows = []
    for m in doc.get("members") or []:
        marks = [w for w, on in (("self", m.get("self")), ("leader", m.get("role") == "leader")) if on]
        connected = m.get("connected")
        rows.append([
            f'<code class="member">{esc(m.get("address"))}</code>' + "".join(f' <b class="tag">{w}</b>' for w in marks),
            f'<span class="role">{esc(m.get("role"))}</span>',
            "—" if connected is None else _ok(connected).replace("FAIL", "unreachable"),
            num(m.get("lag")),
            ago(m.get("last_contact"), now) if m.get("last_contact") else "—",
        ])
    note = doc.get("members_note")
    return (_table(["member", "role", "link", "lag (entries)", "last heard"], rows, "no members known")
            + (f'<p class="dim">{esc(note)}</p>' if note else ""))


def _checks(doc: Doc, now: float) -> str:
    rows = [[esc(name), _ok(c.get("ok")), esc(c.get("detail"))]
            for name, c in sorted((doc.get("checks") or {}).items())]
    return _table(["check", "", "detail"], rows, "no checks")


def _bar(ratio: float) -> str:
    pct = max(0.0, min(100.0, ratio * 100))
    cls = "bar hot" if pct >= 90 else "bar"
    return f'<span class="{cls}"><span style="width:{pct:.1f}%"></span></span> {pct:.1f}%'


def _pool(doc: Doc, now: float) -> str:
    p = doc.get("pool") or {}
    ratio = p.get("max_node_use_ratio")
    co = p.get("checkouts") or {}
    return _kv([
        ("prefixes", esc(", ".join(p.get("prefixes") or []))),
        ("addresses per node", num(p.get("pool_size"))),
        ("mappings", f'<span id="mappings">{num(p.get("mappings"))}</span>'),
        ("nodes / domains", f'{num(p.get("nodes"))} / {num(p.get("domains"))}'),
        ("fullest node", (f'{num(p.get("max_node_use"))} used, {num(p.get("addresses_left"))} left '
                          + _bar(float(ratio))) if isinstance(ratio, (int, float)) else "—"),
        ("checkouts", " · ".join(f"{esc(k)} {num(v)}" for k, v in sorted(co.items())) or "—"),
    ])


def _nat(doc: Doc, now: float) -> str:
    n = doc.get("nat") or {}
    return _kv([
        ("kernel steering", (_ok(True) if n.get("enabled") else
                             '<span class="bad">off</span>' if n.get("configured") else "off by config")
         + f' <span class="dim">{esc(n.get("reason"))}</span>'),
        ("steered (node, address) pairs", num(n.get("steer_elements"))),
        ("flows seen", num(n.get("seen_flows"))),
        ("refused: no mapping", num(n.get("unmapped_rejects"))),
        ("dropped: no mapping, over the reject limit", num(n.get("unmapped_drops"))),
        ("seen-set reads", num(n.get("seen_reads"))),
        ("nftables transactions", f'{num(n.get("reconciles_ok"))} ok, {num(n.get("reconciles_error"))} failed'),
        ("last reconcile", ago(n.get("last_reconcile"), now)),
    ])


def _dns(doc: Doc, now: float) -> str:
    d = doc.get("dns") or {}
    totals: Mapping[str, Any] = d.get("totals") or {}
    rates: Mapping[str, Any] = d.get("rates") or {}
    rows = [[esc(rc), f"{float(rates.get(rc) or 0):.2f}", num(totals[rc])] for rc in sorted(totals)]
    sf = d.get("servfail") or {}
    window = d.get("window")
    tail = (f'<p class="dim">SERVFAIL by reason: {esc(", ".join(f"{k} {v:g}" for k, v in sorted(sf.items())))}</p>'
            if sf else "")
    per = f"per s (last {window:.0f} s)" if isinstance(window, (int, float)) and window > 0 else "per s"
    return _table(["rcode", per, "total"], rows, "no queries answered yet") + tail


def _warnings(doc: Doc, now: float) -> str:
    rows = [[ago(w.get("last"), now), esc(w.get("level")), esc(w.get("logger")),
             esc(str(w.get("template", "")).replace("%s", "…").replace("%d", "…").replace("%r", "…")),
             num(w.get("count"))] for w in doc.get("warnings") or []]
    return (_table(["last", "level", "part", "message", "times"], rows, "no warnings since start")
            + '<p class="dim">Message templates only (names and addresses left out): '
              'the full lines are in the log.</p>')


def _lookup(doc: Doc, now: float) -> str:
    admin_listen = doc.get("admin_listen")
    if not doc.get("admin"):
        return (f'<p>Lookups and per-node pool use need the admin token. Open this page on the admin '
                f'listener, <a href="http://{esc(admin_listen)}/">http://{esc(admin_listen)}/</a> (on this host), '
                'or run <code>appconnector pool lookup NODE DOMAIN</code>.</p>')
    return """<form id="lookup" autocomplete="off" onsubmit="return false">
<label>admin token <input id="token" type="password" size="24" placeholder="contents of admin.token"></label>
<label>node <input id="node" size="16" placeholder="100.64.0.7"></label>
<label>domain <input id="domain" size="22" placeholder="app.example.com"></label>
<button id="go" type="button">look up</button> <button id="use" type="button">per-node use</button>
</form>
<noscript><p>Lookups need JavaScript: the token goes in an Authorization header, never in a URL or cookie.
Or run <code>appconnector pool lookup NODE DOMAIN</code>.</p></noscript>
<div id="answer" class="dim">node × domain → address, targets, last used</div>
<div id="nodeuse"></div>"""


SECTIONS: dict[str, tuple[str, Callable[[Doc, float], str]]] = {
    "summary": ("This connector", _summary), "checks": ("Readiness", _checks),
    "members": ("Members", _members), "pool": ("Pool", _pool), "nat": ("NAT", _nat),
    "dns": ("DNS answers", _dns), "warnings": ("Recent warnings", _warnings),
}


def sections(doc: Doc, now: float | None = None) -> dict[str, str]:
    """Each refreshable section's inner HTML."""
    t = time.time() if now is None else now
    return {key: fn(doc, t) for key, (_, fn) in SECTIONS.items()}


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:baseline}
header h1{font-size:17px;margin:0}header .dim{color:#aab}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:12px;padding:12px}
section{background:#fff;border-radius:6px;padding:8px 14px;box-shadow:0 1px 2px #0002}
section.wide{grid-column:1/-1}h2{font-size:14px;margin:4px 0 8px;text-transform:uppercase;color:#556}
table{border-collapse:collapse;width:100%}td,th{padding:3px 6px;border-bottom:1px solid #eee;text-align:left}
th{font-weight:600;color:#556}dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;margin:0}
dt{color:#556}dd{margin:0}.ok{color:#107a3d;font-weight:600}.bad{color:#b3261e;font-weight:700}
.dim{color:#778;font-size:12px}.tag{background:#e3e8f4;border-radius:3px;padding:0 4px;font-size:11px}
.bar{display:inline-block;width:120px;height:9px;background:#e3e8f4;border-radius:4px;vertical-align:middle}
.bar span{display:block;height:100%;background:#3a6fd8;border-radius:4px}.bar.hot span{background:#b3261e}
form label{margin-right:10px}input{font:inherit}#answer{margin-top:8px}#stale{color:#fc6}
"""

_SCRIPT = """
(function(){
var every=%(every)d*1000, stale=document.getElementById('stale');
function refresh(){
  fetch('/status/page',{cache:'no-store'}).then(function(r){return r.json();}).then(function(d){
    for(var k in d.sections){var el=document.getElementById('s-'+k); if(el) el.innerHTML=d.sections[k];}
    document.getElementById('updated').textContent=d.updated; stale.textContent='';
  }).catch(function(){stale.textContent='(not updating: the connector does not answer)';});
}
setInterval(refresh,every);
var go=document.getElementById('go'); if(!go) return;
function esc(s){var e=document.createElement('span');e.textContent=String(s);return e.innerHTML;}
function admin(path){
  return fetch(path,{cache:'no-store',credentials:'omit',
    headers:{'Authorization':'Bearer '+document.getElementById('token').value.trim()}})
    .then(function(r){return r.json().then(function(j){return [r.status,j];});});
}
var ans=document.getElementById('answer');
go.onclick=function(){
  var q='/pool/lookup?node='+encodeURIComponent(document.getElementById('node').value.trim())+
        '&domain='+encodeURIComponent(document.getElementById('domain').value.trim());
  ans.textContent='asking…';
  admin(q).then(function(a){var s=a[0],j=a[1];
    if(s===200){ans.className='';ans.innerHTML='<code>'+esc(j.node)+'</code> × <code>'+esc(j.domain)+
      '</code> → <b id="address">'+esc(j.address)+'</b>, targets '+esc((j.targets||[]).join(', ')||'none yet')+
      ', last used '+esc(new Date(j.last_used*1000).toISOString());}
    else{ans.className='bad';ans.textContent='HTTP '+s+': '+(j&&j.error||'');}
  }).catch(function(e){ans.className='bad';ans.textContent=String(e);});
};
document.getElementById('use').onclick=function(){
  var out=document.getElementById('nodeuse');
  admin('/pool/nodes').then(function(a){var s=a[0],j=a[1];
    if(s!==200){out.className='bad';out.textContent='HTTP '+s+': '+(j&&j.error||'');return;}
    out.className='';var h='<table><tr><th>node</th><th>mappings</th><th>use</th></tr>';
    (j.nodes||[]).forEach(function(n){var p=Math.min(100,100*n.mappings/j.pool_size);
      h+='<tr><td><code>'+esc(n.node)+'</code></td><td>'+n.mappings+'</td><td><span class="bar'+(p>=90?' hot':'')+
         '"><span style="width:'+p.toFixed(1)+'%%"></span></span> '+p.toFixed(1)+'%%</td></tr>';});
    out.innerHTML=h+'</table>';
  });
};
})();
"""


def page(doc: Doc, *, admin: bool = False, now: float | None = None) -> str:
    """The whole page. ``admin``: the admin listener's copy (lookup box and per-node use)."""
    t = time.time() if now is None else now
    doc = {**doc, "admin": admin}
    parts = sections(doc, t)
    body = []
    for key, (title, _) in SECTIONS.items():
        wide = ' class="wide"' if key in ("members", "warnings") else ""
        body.append(f'<section{wide}><h2>{esc(title)}</h2><div id="s-{key}">{parts[key]}</div></section>')
    body.append(f'<section class="wide"><h2>Lookup</h2>{_lookup(doc, t)}</section>')
    raft = doc.get("raft") or {}
    title = f"appconnector {raft.get('self') or ''}".strip()
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{esc(title)}</title><style>{_CSS}</style></head><body>'
            f'<header><h1>{esc(title)}</h1><span class="dim">{"admin view" if admin else "read-only view"} · '
            f'updated <span id="updated">{esc(updated(t))}</span> <span id="stale"></span></span></header>'
            f'<main>{"".join(body)}</main>'
            f'<script>{_SCRIPT % {"every": REFRESH_SECONDS}}</script></body></html>')


def updated(now: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(now))


def refresh_doc(doc: Doc, now: float | None = None) -> str:
    """The JSON the page's script fetches: the sections rendered again, and the document itself."""
    t = time.time() if now is None else now
    return json.dumps({"updated": updated(t), "sections": sections(doc, t), "data": doc}, default=str)
