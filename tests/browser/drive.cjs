// Drives analytics-next (its UMD bundle, from npm) in a real headless Chromium for
// tests/browser.rs: opens PAGE_URL (a page served by the test that loads the bundle),
// loads the library with only `writeKey` and `cdnURL` (fanout) set, makes the standard
// calls, waits for each to be delivered, loads a pixel as an <img>, and prints one JSON
// line: the messageIds the library gave each call, the image's load, and every request
// the page made to fanout with its status.
//
// Environment: FANOUT_BROWSER_DEPS (a directory with node_modules/playwright-core),
// FANOUT_CHROMIUM (the browser binary), PAGE_URL, CDN_URL, WRITE_KEY, SCREENSHOT (a path).
const path = require("path");
const { chromium } = require(path.join(process.env.FANOUT_BROWSER_DEPS, "node_modules", "playwright-core"));

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.FANOUT_CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const requests = [];
  const failures = [];
  try {
    const page = await browser.newPage();
    page.on("response", (r) => {
      if (r.url().startsWith(process.env.CDN_URL)) {
        requests.push({ method: r.request().method(), url: r.url(), status: r.status() });
      }
    });
    page.on("requestfailed", (r) => failures.push({ url: r.url(), error: r.failure() && r.failure().errorText }));
    page.on("pageerror", (e) => failures.push({ pageerror: String(e) }));
    await page.goto(process.env.PAGE_URL);
    const ids = await page.evaluate(async ({ writeKey, cdnURL }) => {
      const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load({ writeKey, cdnURL });
      const id = (ctx) => ctx.event.messageId;
      return {
        identify: id(await analytics.identify("browser-user", { plan: "pro", email: "b@example.com" })),
        track: id(await analytics.track("Browser Event", { n: 1 })),
        page: id(await analytics.page("Docs", "Home")),
        group: id(await analytics.group("browser-group", { name: "Acme" })),
      };
    }, { writeKey: process.env.WRITE_KEY, cdnURL: process.env.CDN_URL });
    // A pixel, fetched the way an <img> tag (or an e-mail client) does.
    const pixel = await page.evaluate(({ writeKey, cdnURL }) => new Promise((resolve) => {
      const data = btoa(JSON.stringify({ writeKey, userId: "pixel-user", event: "Email Opened",
                                         messageId: "pixel-img-1" }));
      const img = new Image();
      img.onload = () => resolve({ loaded: true, width: img.naturalWidth, height: img.naturalHeight });
      img.onerror = () => resolve({ loaded: false });
      img.src = cdnURL + "/v1/pixel/track?data=" + encodeURIComponent(data);
    }), { writeKey: process.env.WRITE_KEY, cdnURL: process.env.CDN_URL });
    ids.pixel = pixel;
    await page.screenshot({ path: process.env.SCREENSHOT });
    console.log(JSON.stringify({ ids, requests, failures }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
