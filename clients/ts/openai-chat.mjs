// The official `openai` npm package as a client of ragapi's OpenAI-compatible endpoint:
// a chat completion, the same streamed, an unknown model, and the model list. Prints one JSON
// object with what it received; tests/clients/test_openai_clients.py asserts on it.
//
//   RAGAPI_E2E_URL=http://127.0.0.1:8000 RAGAPI_E2E_API_KEY=rk_... \
//   RAGAPI_CHAT_MESSAGES='[{"role":"user","content":"..."}]' node openai-chat.mjs
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: `${process.env.RAGAPI_E2E_URL}/v1`,
  apiKey: process.env.RAGAPI_E2E_API_KEY,
  maxRetries: 0,
});
const model = process.env.RAGAPI_CHAT_MODEL ?? "ragapi";
const messages = JSON.parse(process.env.RAGAPI_CHAT_MESSAGES);

const completion = await client.chat.completions.create({ model, messages });

const stream = await client.chat.completions.create({
  model,
  messages,
  stream: true,
  stream_options: { include_usage: true },
});
const streamed = { text: "", citations: null, finish_reason: null, usage: null, chunks: 0 };
for await (const chunk of stream) {
  streamed.chunks += 1;
  const choice = chunk.choices[0];
  if (choice) {
    streamed.text += choice.delta.content ?? "";
    streamed.citations = choice.delta.citations ?? streamed.citations;
    streamed.finish_reason = choice.finish_reason ?? streamed.finish_reason;
  }
  streamed.usage = chunk.usage ?? streamed.usage;
}

let unknownModel = null;
try {
  await client.chat.completions.create({ model: "gpt-4o", messages });
} catch (error) {
  unknownModel = { status: error.status, code: error.code, param: error.param, name: error.name };
}

const models = [];
for await (const found of client.models.list()) {
  models.push(found.id);
}

console.log(JSON.stringify({ completion, streamed, unknownModel, models }));
