// Colloquy's page: plain JavaScript over the same HTTP API as any OpenAI client
// (/v1/models to check the key, /v1/chat/completions streamed, /v1/feedback for ratings and rankings,
// /v1/conversations to list, open and delete the user's conversations).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("colloquy-key") || "", conversationId: "", controller: null };

function headers() {
  return { "Authorization": `Bearer ${state.key}`, "Content-Type": "application/json" };
}

async function errorText(res) {
  try { return (await res.json()).error.message; } catch { return `HTTP ${res.status}`; }
}

// -- sign in ---------------------------------------------------------------------------------------
async function signIn(key) {
  const res = await fetch("/v1/models", { headers: { "Authorization": `Bearer ${key}` } });
  if (!res.ok) throw new Error(await errorText(res));
  state.key = key;
  sessionStorage.setItem("colloquy-key", key);
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  $("new-chat").hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = "signed in";
  $("conversations").hidden = false;
  document.body.classList.add("signed-in");
  $("message").focus();
  await refreshConversations();
}

$("sign-in-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("sign-in-error").textContent = "";
  try { await signIn($("api-key").value.trim()); } catch (err) { $("sign-in-error").textContent = err.message; }
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem("colloquy-key");
  location.reload();
});

function newChat() {
  state.conversationId = "";
  $("messages").replaceChildren();
  $("chat-error").textContent = "";
  markCurrent();
}

$("new-chat").addEventListener("click", newChat);

// -- the conversation list -------------------------------------------------------------------------
function markCurrent() {
  for (const li of $("conversation-list").children) li.classList.toggle("current", li.dataset.id === state.conversationId);
}

async function refreshConversations() {
  const res = await fetch("/v1/conversations?limit=100", { headers: headers() });
  if (!res.ok) { $("list-status").textContent = await errorText(res); return; }
  const page = await res.json();
  $("conversation-list").replaceChildren(...page.data.map((c) => {
    const li = el("li");
    li.dataset.id = c.id;
    const open = el("button", "open", c.title || "(untitled)");
    open.title = c.title;
    open.addEventListener("click", () => openConversation(c.id));
    const del = el("button", "delete", "Delete");
    del.title = "Delete this conversation";
    del.addEventListener("click", () => deleteConversation(c.id));
    li.append(open, del);
    return li;
  }));
  markCurrent();
}

async function openConversation(id) {
  if (state.controller) return; // an answer is streaming: Stop it first
  const turns = [];
  let token = "";
  do { // every page of turns
    const res = await fetch(`/v1/conversations/${encodeURIComponent(id)}${token ? `?page_token=${encodeURIComponent(token)}` : ""}`,
      { headers: headers() });
    if (!res.ok) { $("list-status").textContent = await errorText(res); return; }
    const page = await res.json();
    turns.push(...page.turns);
    token = page.next_page_token;
  } while (token);
  newChat();
  state.conversationId = id;
  for (const t of turns) {
    $("messages").append(el("div", "user", t.user_message));
    const turnEl = el("div", "turn");
    turnEl.dataset.turn = t.index;
    turnEl.dataset.conversation = id;
    $("messages").append(turnEl);
    for (const a of t.answers) {
      const card = answerCard(turnEl, a.index);
      card.dataset.finish = a.finish_reason;
      card.querySelector(".status").textContent = finishLabel(a.finish_reason);
      if (t.blocked) { card.querySelector(".notice").textContent = a.text; continue; } // the refusal
      card.dataset.text = a.text;
      card.querySelector(".text").innerHTML = markdown(a.text);
    }
  }
  markCurrent();
}

async function deleteConversation(id) {
  $("list-status").textContent = "";
  const res = await fetch(`/v1/conversations/${encodeURIComponent(id)}`, { method: "DELETE", headers: headers() });
  if (!res.ok) { $("list-status").textContent = await errorText(res); return; }
  if (id === state.conversationId) newChat();
  await refreshConversations();
  $("list-status").textContent = "Conversation deleted";
}

// -- rendering -------------------------------------------------------------------------------------
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// A small Markdown subset: fenced code, inline code, bold, italics, line breaks (text is escaped first).
function markdown(text) {
  return escapeHtml(text).split(/```/).map((part, i) => {
    if (i % 2 === 1) return `<pre><code>${part.replace(/^\w*\n/, "")}</code></pre>`;
    return part.replace(/`([^`]+)`/g, "<code>$1</code>").replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/\*([^*]+)\*/g, "<em>$1</em>").replace(/\n/g, "<br>");
  }).join("");
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function answerCard(turnEl, index) {
  let card = turnEl.querySelector(`.answer[data-index="${index}"]`);
  if (card) return card;
  card = el("div", "answer");
  card.dataset.index = index;
  card.dataset.text = "";
  card.append(el("div", "text"), el("div", "notice"), el("div", "status", "…"), el("div", "tools"));
  turnEl.append(card);
  return card;
}

// -- feedback --------------------------------------------------------------------------------------
async function sendFeedback(body) {
  const res = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!res.ok) throw new Error(await errorText(res));
  return res.json();
}

function addRating(card, conv, turn) {
  const tools = card.querySelector(".tools");
  const comment = el("input", "comment");
  comment.placeholder = "optional comment";
  const up = el("button", "thumbs-up", "Thumbs up");
  const down = el("button", "thumbs-down", "Thumbs down");
  const copy = el("button", "copy", "Copy");
  const said = el("span", "feedback-status");
  copy.addEventListener("click", () => navigator.clipboard?.writeText(card.dataset.text).catch(() => {}));
  for (const [btn, thumbsUp] of [[up, true], [down, false]]) {
    btn.addEventListener("click", async () => {
      up.disabled = down.disabled = true;
      try {
        await sendFeedback({ conversation_id: conv, turn_index: turn,
          rating: { answer_index: Number(card.dataset.index), thumbs_up: thumbsUp, comment: comment.value } });
        said.textContent = "Thanks for the feedback";
      } catch (err) { said.textContent = err.message; up.disabled = down.disabled = false; }
    });
  }
  tools.append(up, down, comment, copy, said);
}

function addRanking(turnEl, conv, turn, n) {
  // order: answer indexes best first; ties[i]: order[i] and order[i + 1] are as good as each other
  // ("Tie" ranks an answer level with the one ranked just before it: training takes no pair from a tie).
  const order = [];
  const ties = [];
  const bar = el("div", "rank-bar");
  const hint = el("span", "status",
    `Click "Rank" on the answers from best to worst (${n} answers); "Tie" puts one level with the answer ranked before it.`);
  const submit = el("button", "submit-ranking", "Send ranking");
  const reset = el("button", "reset-ranking", "Reset");
  submit.disabled = true;
  bar.append(hint, reset, submit);
  turnEl.append(bar);
  const refresh = () => {
    submit.disabled = order.length !== n;
    turnEl.querySelectorAll(".answer").forEach((card) => {
      const ranked = order.includes(Number(card.dataset.index));
      card.querySelector(".rank").disabled = ranked;
      card.querySelector(".tie").disabled = ranked || !order.length;
    });
  };
  const place = (card, badge, tied) => {
    if (order.length) ties.push(tied);
    order.push(Number(card.dataset.index));
    const rank = 1 + ties.filter((t) => !t).length;
    badge.textContent = tied ? `#${rank} (tie)` : `#${rank}`;
    refresh();
  };
  for (const card of turnEl.querySelectorAll(".answer")) {
    const btn = el("button", "rank", "Rank");
    const tie = el("button", "tie", "Tie");
    const badge = el("span", "rank-badge");
    btn.addEventListener("click", () => place(card, badge, false));
    tie.addEventListener("click", () => place(card, badge, true));
    card.querySelector(".tools").append(btn, tie, badge);
  }
  refresh();
  reset.addEventListener("click", () => {
    order.length = 0;
    ties.length = 0;
    turnEl.querySelectorAll(".rank-badge").forEach((b) => { b.textContent = ""; });
    refresh();
  });
  submit.addEventListener("click", async () => {
    submit.disabled = reset.disabled = true;
    const ranking = ties.some((t) => t) ? { order, tied_with_next: ties } : { order };
    try {
      await sendFeedback({ conversation_id: conv, turn_index: turn, ranking });
      const sep = (k) => (k ? (ties[k - 1] ? " = " : " > ") : "");
      hint.textContent = "Ranking sent: " + order.map((i, k) => `${sep(k)}answer ${i + 1}`).join("");
    } catch (err) { hint.textContent = err.message; submit.disabled = reset.disabled = false; }
  });
}

// -- chatting --------------------------------------------------------------------------------------
function finishLabel(reason) {
  return { stop: "done", length: "cut at the length limit", content_filter: "stopped by moderation" }[reason] || reason;
}

// The gateway answers 503 with Retry-After while it is still saving this conversation's previous
// turn; nothing was started, so the message is sent again after the wait (3 times at most).
async function postChat(body, signal) {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal });
    const wait = Number(res.headers.get("Retry-After"));
    if (res.status !== 503 || !wait || attempt === 3) return res;
    $("chat-error").textContent = `${await errorText(res)} (retrying in ${wait}s)`;
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    $("chat-error").textContent = "";
  }
}

async function send(text, n) {
  const messages = $("messages");
  messages.append(el("div", "user", text));
  const turnEl = el("div", "turn");
  messages.append(turnEl);
  for (let i = 0; i < n; i++) answerCard(turnEl, i);
  const body = { model: "colloquy", stream: true, n, messages: [{ role: "user", content: text }] };
  if (state.conversationId) body.conversation_id = state.conversationId;
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  let turn = 0;
  let finished = false;
  try {
    const res = await postChat(body, state.controller.signal);
    if (!res.ok) throw new Error(await errorText(res));
    state.conversationId = res.headers.get("X-Colloquy-Conversation-Id") || state.conversationId;
    turn = Number(res.headers.get("X-Colloquy-Turn-Index"));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
        if (!data) continue;
        if (data === "[DONE]") { finished = true; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.retraction) { // stream-first moderation withdrew text: keep kept_chars code points
          const card = answerCard(turnEl, chunk.retraction.index);
          card.dataset.text = Array.from(card.dataset.text).slice(0, chunk.retraction.kept_chars).join("");
          card.querySelector(".text").innerHTML = markdown(card.dataset.text);
        }
        if (chunk.moderation && chunk.moderation.action === "warn") {
          answerCard(turnEl, chunk.moderation.index).querySelector(".notice").textContent = chunk.moderation.message;
        }
        for (const choice of chunk.choices || []) {
          const card = answerCard(turnEl, choice.index);
          if (choice.delta.content) {
            card.dataset.text += choice.delta.content;
            card.querySelector(".text").innerHTML = markdown(card.dataset.text);
            card.querySelector(".status").textContent = "…";
          }
          if (choice.delta.refusal) card.querySelector(".notice").textContent = choice.delta.refusal;
          if (choice.finish_reason) {
            card.dataset.finish = choice.finish_reason;
            card.querySelector(".status").textContent = finishLabel(choice.finish_reason);
          }
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      turnEl.querySelectorAll(".status").forEach((s) => { s.textContent = "stopped"; });
    } else {
      $("chat-error").textContent = err.message;
      turnEl.querySelectorAll(".status").forEach((s) => { s.textContent = "failed"; });
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").hidden = true;
  }
  refreshConversations(); // a new conversation joins the list; the latest activity moves it up
  // A message refused by moderation has no answer to judge (the gateway refuses feedback on it).
  const refused = [...turnEl.querySelectorAll(".answer")].every(
    (c) => c.dataset.finish === "content_filter" && !c.dataset.text);
  if (finished && turn && !refused) {
    turnEl.dataset.turn = turn;
    turnEl.dataset.conversation = state.conversationId;
    if (n === 1) addRating(answerCard(turnEl, 0), state.conversationId, turn);
    else addRanking(turnEl, state.conversationId, turn, n);
  }
}

$("composer").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("message").value;
  if (!text.trim() || state.controller) return;
  $("message").value = "";
  $("chat-error").textContent = "";
  await send(text, Number($("candidates").value));
});

$("message").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});

$("stop").addEventListener("click", () => state.controller?.abort());

if (state.key) signIn(state.key).catch(() => sessionStorage.removeItem("colloquy-key"));
