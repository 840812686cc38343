// The gateway's HTTP API as the chat page calls it: a fetch that sends the key as a Bearer token
// and turns any non-2xx answer into an ApiError read from its body (the OpenAI error shape,
// docs/reliability.md section 1), and the `data:` payloads of a server-sent-events body.

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status; // null for an error that arrived mid-stream
    this.type = error.type || "error";
    this.code = error.code ?? null;
    this.param = error.param ?? null;
  }
}

export async function api(path, key, init = {}) {
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const res = await fetch(path, { ...init, headers });
  if (!res.ok) {
    let body = {};
    try {
      body = await res.json();
    } catch {
      // not JSON (a proxy's page): the status alone describes it
    }
    throw new ApiError(res.status, body.error || {});
  }
  return res;
}

// The `data:` payloads of an SSE body, parsed, until `data: [DONE]`. Frames end with a blank
// line; a frame may arrive split over several reads.
export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // already closed or aborted: nothing left to release
  }
}
