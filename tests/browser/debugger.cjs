// Opens fanout's /debugger page (PAGE_URL, token in the fragment) in a real headless
// Chromium, prints "live" once its stream is open, waits until WAIT_ROWS (default 1) table rows show WAIT_FOR (a messageId the
// test keeps sending) with a destination outcome, clicks the first (waiting, when WAIT_DETAIL is set, for its
// detail to show that text), saves a screenshot, and prints one
// JSON line: the first such row's text and all of them, the connection status, the
// page's URL afterwards, the page's Content-Security-Policy, any CSP violations, console
// errors and failed requests (but the favicon the page does not have), the fanout_admin cookie as the browser holds it, document.cookie, and the clicked row's
// detail panel text.
const path = require("path");
const { chromium } = require(path.join(process.env.FANOUT_BROWSER_DEPS, "node_modules", "playwright-core"));

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.FANOUT_CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 720 } });
    const page = await context.newPage();
    const consoleErrors = [];
    const failedRequests = [];
    // A failed load is reported below with its URL.
    page.on("console", (m) => {
      if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
    });
    page.on("response", (r) => {
      if (r.status() >= 400 && new URL(r.url()).pathname !== "/favicon.ico") {
        failedRequests.push(r.status() + " " + r.url());
      }
    });
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
    // Added by the browser's debugging protocol, so the page's CSP does not stop it.
    await page.addInitScript(() => {
      window.__violations = [];
      document.addEventListener("securitypolicyviolation",
        (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
    });
    const response = await page.goto(process.env.PAGE_URL);
    await page.locator("#status.live").waitFor({ timeout: 20000 });
    console.log("live");
    const wanted = Number(process.env.WAIT_ROWS || "1");
    const rows = page.locator("tr.row", { hasText: process.env.WAIT_FOR }).filter({ hasText: "✓" });
    const deadline = Date.now() + 20000;
    while ((await rows.count()) < wanted) {
      if (Date.now() > deadline) {
        const status = await page.locator("#status span").textContent();
        throw new Error("rows never came; status: " + status + "; errors: " + consoleErrors.join(" | "));
      }
      await page.waitForTimeout(200);
    }
    const row = rows.first();
    await row.click();
    await page.locator("aside pre").first().waitFor();
    if (process.env.WAIT_DETAIL) {
      await page.locator("aside", { hasText: process.env.WAIT_DETAIL }).waitFor({ timeout: 20000 });
    }
    await page.screenshot({ path: process.env.SCREENSHOT });
    const status = (await page.locator("#status span").textContent()).trim();
    const cookie = (await context.cookies()).find((c) => c.name === "fanout_admin") || null;
    console.log(JSON.stringify({
      row: await row.textContent(),
      rows: await rows.allTextContents(),
      status,
      url: page.url(),
      csp: response.headers()["content-security-policy"] || null,
      violations: await page.evaluate(() => window.__violations),
      consoleErrors,
      failedRequests,
      cookie,
      documentCookie: await page.evaluate(() => document.cookie),
      detail: await page.locator("aside").textContent(),
    }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
