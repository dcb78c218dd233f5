// The hosted Llama Guard 3 Vision sample for the openai npm package; only baseURL and apiKey
// differ (tests/test_http.py fills them in from GUARDRT_BASE_URL / GUARDRT_API_KEY).
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.GUARDRT_BASE_URL, apiKey: process.env.GUARDRT_API_KEY });

const response = await client.chat.completions.create({
  model: "meta-llama/Llama-Guard-3-11B-Vision-Turbo",
  messages: [
    { role: "system", content: "You are an AI assistant who knows everything." },
    { role: "user", content: "Tell me, why is the sky blue?" },
  ],
});

console.log(`Assistant: ${response.choices[0].message.content}`);
