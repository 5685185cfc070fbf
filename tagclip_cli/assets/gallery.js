
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("gallery-data").textContent);
  const classes = data.classes;
  const cardsEl = document.getElementById("cards");
  const select = document.getElementById("class-filter");
  const nameInput = document.getElementById("name-filter");
  const state = { cls: "all", q: "", page: 1 };

  function has(card, index) {
    return card.tags.some(function (t) { return t[0] === index; }) || card.masks.indexOf(index) >= 0;
  }
  function matches(card) {
    if (state.cls === "failed" && !card.err) return false;
    if (state.cls !== "all" && state.cls !== "failed" && !has(card, Number(state.cls))) return false;
    return !state.q || card.id.toLowerCase().indexOf(state.q.toLowerCase()) >= 0;
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function buildSelect() {
    const counts = classes.map(function () { return 0; });
    let failed = 0;
    data.cards.forEach(function (c) {
      if (c.err) failed += 1;
      classes.forEach(function (_, i) { if (has(c, i)) counts[i] += 1; });
    });
    const add = function (value, label) {
      const o = el("option", null, label); o.value = value; select.appendChild(o);
    };
    add("all", "all images (" + data.cards.length + ")");
    add("failed", "failed (" + failed + ")");
    classes.map(function (c, i) { return [c.name, i]; })
      .filter(function (p) { return counts[p[1]] > 0; })
      .sort(function (a, b) { return a[0].localeCompare(b[0]); })
      .forEach(function (p) { add(String(p[1]), p[0] + " (" + counts[p[1]] + ")"); });
  }
  function card(c) {
    const div = el("div", "card" + (c.err ? " failed" : ""));
    div.dataset.id = c.id;
    const link = el("a", "thumb");
    link.href = c.o;
    link.title = "full-size overlay";
    const img = el("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.width = c.tw;
    img.height = c.th;
    img.alt = c.id;
    img.src = c.t;
    link.appendChild(img);
    div.appendChild(link);
    div.appendChild(el("div", "name", c.id));
    div.appendChild(el("div", "meta", c.size));
    if (c.err) div.appendChild(el("div", "error", "FAILED: " + c.err));
    if (c.doubt) {
      const d = el("div", "meta doubt", "closest decision: " + classes[c.doubt[0]].name + ", " +
        c.doubt[1].toFixed(3) + " from its threshold " + c.doubt[2].toFixed(2));
      d.title = "|normalised score - threshold|: the smaller, the likelier a wrong tag decision";
      div.appendChild(d);
    }
    const tags = el("div", "tags");
    c.tags.forEach(function (t) {
      const name = t[0] >= 0 ? classes[t[0]].name : "?";
      const chip = el("span", "tag", t[1] === null ? name : name + " " + t[1].toFixed(2));
      if (t[0] >= 0 && c.masks.indexOf(t[0]) >= 0) {
        chip.className = "tag masked";
        chip.style.background = classes[t[0]].color;
        chip.style.color = classes[t[0]].ink;
        chip.title = "has a mask";
      }
      tags.appendChild(chip);
    });
    c.masks.forEach(function (m) {
      if (c.tags.some(function (t) { return t[0] === m; })) return;
      const chip = el("span", "tag masked", classes[m].name + " (mask)");
      chip.style.background = classes[m].color;
      chip.style.color = classes[m].ink;
      tags.appendChild(chip);
    });
    if (!c.err && c.tags.length === 0) tags.appendChild(el("span", "meta", "no tags"));
    div.appendChild(tags);
    return div;
  }
  function pager(nav, pages) {
    nav.textContent = "";
    const prev = el("button", "prev", "\u2190 prev");
    prev.disabled = state.page <= 1;
    prev.onclick = function () { go(state.page - 1); };
    const next = el("button", "next", "next \u2192");
    next.disabled = state.page >= pages;
    next.onclick = function () { go(state.page + 1); };
    nav.appendChild(prev);
    nav.appendChild(el("span", "page-label", "page " + state.page + " of " + pages));
    nav.appendChild(next);
  }
  function render() {
    const shown = data.cards.filter(matches);
    const pages = Math.max(1, Math.ceil(shown.length / data.pageSize));
    state.page = Math.min(Math.max(1, state.page), pages);
    const start = (state.page - 1) * data.pageSize;
    const frag = document.createDocumentFragment();
    shown.slice(start, start + data.pageSize).forEach(function (c) { frag.appendChild(card(c)); });
    cardsEl.textContent = "";
    cardsEl.appendChild(frag);
    if (!shown.length) cardsEl.appendChild(el("div", "empty", "no image matches"));
    document.getElementById("count").textContent = shown.length + " of " + data.cards.length + " images";
    pager(document.getElementById("pager-top"), pages);
    pager(document.getElementById("pager-bottom"), pages);
    document.body.dataset.ready = "1";
  }
  function writeHash() {
    const parts = [];
    if (state.cls !== "all") parts.push("class=" + encodeURIComponent(state.cls === "failed" ? "failed"
      : classes[Number(state.cls)].name));
    if (state.q) parts.push("q=" + encodeURIComponent(state.q));
    if (state.page > 1) parts.push("page=" + state.page);
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname);
  }
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const cls = params.get("class");
    state.cls = "all";
    if (cls === "failed") state.cls = "failed";
    else if (cls !== null) {
      const i = classes.findIndex(function (c) { return c.name === cls; });
      if (i >= 0) state.cls = String(i);
    }
    state.q = params.get("q") || "";
    state.page = parseInt(params.get("page") || "1", 10) || 1;
    select.value = state.cls;
    nameInput.value = state.q;
  }
  function go(page) { state.page = page; writeHash(); render(); window.scrollTo(0, 0); }
  select.onchange = function () { state.cls = select.value; state.page = 1; writeHash(); render(); };
  nameInput.oninput = function () { state.q = nameInput.value; state.page = 1; writeHash(); render(); };
  window.addEventListener("hashchange", function () { readHash(); render(); });
  buildSelect();
  readHash();
  render();
})();
