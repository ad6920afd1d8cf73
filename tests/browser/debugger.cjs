// Opens fanout's /debugger page (PAGE_URL, token in the fragment) in a real headless
// Chromium, waits until a table row shows WAIT_FOR (a messageId the test keeps sending)
// with a destination outcome, saves a screenshot, and prints one JSON line: the row's
// text, the connection status and the page's URL afterwards.
const path = require("path");
const { chromium } = require(path.join(process.env.FANOUT_BROWSER_DEPS, "node_modules", "playwright-core"));

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.FANOUT_CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
    await page.goto(process.env.PAGE_URL);
    const row = page.locator("tr.row", { hasText: process.env.WAIT_FOR }).filter({ hasText: "✓" }).first();
    await row.waitFor({ timeout: 20000 });
    await row.click();
    await page.locator("aside pre").first().waitFor();
    await page.screenshot({ path: process.env.SCREENSHOT });
    const status = (await page.locator("#status span").textContent()).trim();
    console.log(JSON.stringify({ row: await row.textContent(), status, url: page.url() }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
