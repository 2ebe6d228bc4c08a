// The official openai npm package against chatpipe's /v1, as a Node app uses it.
//   node stream.mjs BASE_URL MODEL MESSAGE [ABORT_AFTER]
// Streams a chat completion; with ABORT_AFTER, aborts it (AbortController) after that many
// content chunks. Prints one JSON line: {id, text, chunks, finish_reason, aborted, error?}.
import OpenAI from "openai";

const [baseURL, model, message, abortAfter] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: process.env.OPENAI_API_KEY || "sk-not-checked", maxRetries: 0 });
const controller = new AbortController();
const out = { id: null, text: "", chunks: 0, finish_reason: null, aborted: false };
try {
  const stream = await client.chat.completions.create(
    { model, messages: [{ role: "user", content: message }], stream: true },
    { signal: controller.signal },
  );
  for await (const chunk of stream) {
    out.id = chunk.id;
    const choice = chunk.choices[0];
    if (choice?.delta?.content) {
      out.text += choice.delta.content;
      out.chunks += 1;
    }
    if (choice?.finish_reason) out.finish_reason = choice.finish_reason;
    if (abortAfter && out.chunks >= Number(abortAfter)) {
      out.aborted_at_ms = Date.now();
      controller.abort();
      break;
    }
  }
  out.aborted = controller.signal.aborted;
} catch (e) {
  if (e instanceof OpenAI.APIUserAbortError || controller.signal.aborted) out.aborted = true;
  else out.error = String(e);
}
console.log(JSON.stringify(out));
