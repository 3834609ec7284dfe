// Drive Debian's chromium (headless, no browser download) through playwright-core: open pages of a
// served folder and print what they report, as JSON. Used by tests/edge/test_browser.py and scripts/bench_edge.py.
//   node browser/run.mjs CONFIG.json   (config: {chromium, jobs: [{url, webgpu, wait, screenshot, type}]})
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const WEBGPU_FLAGS = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-angle=swiftshader", "--use-webgpu-adapter=swiftshader"];
const results = [];

for (const job of cfg.jobs) {
  const browser = await chromium.launch({
    executablePath: cfg.chromium ?? "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", ...(job.webgpu ? WEBGPU_FLAGS : ["--disable-gpu"])],
  });
  const out = { url: job.url };
  try {
    const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
    const console_ = [];
    page.on("console", (m) => console_.push(`${m.type()}: ${m.text()}`.slice(0, 300)));
    page.on("pageerror", (e) => console_.push(`pageerror: ${e.message}`.slice(0, 300)));
    await page.goto(job.url);
    if (job.type) {
      await page.waitForFunction("window.demo && window.demo.session || window.demo.error", null, { timeout: job.timeoutMs ?? 120000 });
      await page.fill("#prompt", job.type);
    }
    const handle = await page.waitForFunction(job.wait, null, { timeout: job.timeoutMs ?? 120000, polling: 200 });
    out.result = await handle.jsonValue();
    if (job.evaluate) out.extra = await page.evaluate(job.evaluate);
    if (job.screenshot) await page.screenshot({ path: job.screenshot, fullPage: true });
    out.console = console_.slice(-20);
  } catch (e) {
    out.error = String(e.message ?? e).split("\n")[0];
  } finally {
    await browser.close();
  }
  results.push(out);
}
console.log(JSON.stringify(results));
