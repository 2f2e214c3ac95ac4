// One upload driven by tus-js-client exactly as a user's client would drive it (its options
// only; nothing on the server knows this client): the whole file in one PATCH, resumed after
// failures. Prints JSON lines: the upload's URL once created, progress every MiB sent, every
// answer that is not a success, the offset each HEAD reports, then `done` (or the error).
//   node tus_upload.js ENDPOINT COOKIE FILE SKU
const fs = require('fs');
const tus = require('tus-js-client');

const [endpoint, cookie, file, sku] = process.argv.slice(2);
const say = (line) => process.stdout.write(JSON.stringify(line) + '\n');
let reported = 0;
const upload = new tus.Upload(fs.readFileSync(file), {
  endpoint,
  headers: { Cookie: cookie },
  metadata: { filename: 'review.bin', sku },
  retryDelays: [0, 250, 500, 1000, 2000, 3000, 5000, 8000],
  onProgress: (sent, total) => {
    if (sent - reported >= 1 << 20 || sent === total) {
      reported = sent;
      say({ sent, total });
    }
  },
  onUploadUrlAvailable: () => say({ url: upload.url }),
  onAfterResponse: (req, res) => {
    const status = res.getStatus();
    if (req.getMethod() === 'HEAD' && status === 200) {
      say({ head_offset: Number(res.getHeader('Upload-Offset')) });
    } else if (status >= 300) {
      say({ answer: `${req.getMethod()} ${status}` });
    }
  },
  onError: (error) => {
    say({ error: String(error) });
    process.exit(1);
  },
  onSuccess: () => say({ done: upload.url }),
});
upload.start();
