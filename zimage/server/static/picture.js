// zimage web page, the picture a generation starts from (img2img), the mask painted on it (inpainting) and the
// margins that grow it (outpainting). Loaded after app.js (uses its $); app.js asks pictureFields() for the request.
//
// What is sent is always what the canvases hold, as PNG: the picture as drawn (the browser has applied its EXIF
// rotation, as the server would) and a mask of exactly its size, so the two always match.
"use strict";

const MAX_SIDE = 2048;  // the model's largest side: a bigger picture is scaled down when loaded (said in the UI)
const MIN_SIDE = 256;  // and its smallest: a smaller picture is sent as it is (the server's message says why not)
const DEFAULT_STRENGTH = 0.6;  // the server's defaults: 0.6 from a picture, 1.0 with a mask
const MASK_STRENGTH = 1.0;
const PAINT = "rgb(255, 40, 90)";  // the mask canvas shows strokes in this colour, made see-through by CSS

const pic = { loaded: false, scaled: false, strengthTouched: false, painting: null };

// ------------------------------------------------------------------ loading a picture
async function usePicture(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch (e) {
    $("form-error").textContent = "that file is not a picture this browser can read (use PNG, JPEG or WebP)";
    return;
  }
  const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  const w = Math.round(bitmap.width * scale), h = Math.round(bitmap.height * scale);
  for (const c of [$("picture"), $("mask")]) { c.width = w; c.height = h; }  // resizing clears both
  $("picture").getContext("2d").drawImage(bitmap, 0, 0, w, h);
  bitmap.close();
  pic.loaded = true;
  pic.scaled = scale < 1;
  $("form-error").textContent = "";
  $("canvas-wrap").hidden = $("image-controls").hidden = $("image-remove").hidden = false;
  $("drop-hint").hidden = true;
  maskChanged();
}

function removePicture() {
  pic.loaded = false;
  $("image-file").value = "";
  $("canvas-wrap").hidden = $("image-controls").hidden = $("image-remove").hidden = true;
  $("drop-hint").hidden = false;
  sizeFollowsPicture(false);
}

// with a picture the server makes images of its size (size "auto"): the size inputs would be ignored
function sizeFollowsPicture(on) {
  for (const id of ["aspect", "width", "height"]) $(id).disabled = on;
}

// ------------------------------------------------------------------ painting the mask (pointer events: mouse, pen, touch)
function maskPoint(ev) {
  const c = $("mask"), r = c.getBoundingClientRect();  // the canvas is shown scaled: back to picture pixels
  return [(ev.clientX - r.left) * c.width / r.width, (ev.clientY - r.top) * c.height / r.height];
}

function stroke(from, to) {
  const ctx = $("mask").getContext("2d");
  ctx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  ctx.strokeStyle = PAINT;
  ctx.lineWidth = Number($("brush").value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...from);
  ctx.lineTo(...to);  // from === to: a dot (round caps)
  ctx.stroke();
}

function onPointerDown(ev) {
  if (ev.button !== 0) return;
  ev.preventDefault();
  $("mask").setPointerCapture(ev.pointerId);  // the stroke goes on when the pointer leaves the canvas
  pic.painting = maskPoint(ev);
  stroke(pic.painting, pic.painting);
}

function onPointerMove(ev) {
  if (!pic.painting) return;
  const p = maskPoint(ev);
  stroke(pic.painting, p);
  pic.painting = p;
}

function onPointerUp() {
  if (!pic.painting) return;
  pic.painting = null;
  maskChanged();
}

function clearMask() {
  const c = $("mask");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  maskChanged();
}

function invertMask() {
  const c = $("mask"), ctx = c.getContext("2d");
  const img = ctx.getImageData(0, 0, c.width, c.height);
  const on = paintedBits(img);
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.fillStyle = PAINT;
  ctx.fillRect(0, 0, c.width, c.height);
  const out = ctx.getImageData(0, 0, c.width, c.height);
  for (let i = 0; i < on.length; i++) out.data[4 * i + 3] = on[i] ? 0 : 255;
  ctx.putImageData(out, 0, 0);
  maskChanged();
}

// painted = alpha at least half (strokes' anti-aliased edges count or not, as in the picture shown): 1 per pixel
function paintedBits(img) {
  const bits = new Uint8Array(img.width * img.height);
  for (let i = 0; i < bits.length; i++) bits[i] = img.data[4 * i + 3] >= 128 ? 1 : 0;
  return bits;
}

function maskBits() {
  const c = $("mask");
  return paintedBits(c.getContext("2d").getImageData(0, 0, c.width, c.height));
}

// ------------------------------------------------------------------ strength: 1.0 once there is a mask, unless chosen
function showStrength() { $("strength-value").textContent = Number($("strength").value).toFixed(2); }

function maskChanged() {
  const masked = maskBits().includes(1) || hasMargins();
  if (!pic.strengthTouched) $("strength").value = masked ? MASK_STRENGTH : DEFAULT_STRENGTH;
  showStrength();
  $("strength-note").textContent = pic.strengthTouched ? "(your choice)"
    : masked ? "(1.0: the masked area is repainted from noise; move the slider to keep more of it)"
      : "(default; painting a mask or adding margins switches it to 1.0)";
  showSizeInfo();
}

// ------------------------------------------------------------------ outpainting
function margins() {
  const m = {};
  for (const side of ["left", "top", "right", "bottom"]) m[side] = Math.max(0, Math.floor(Number($(`pad-${side}`).value) || 0));
  return m;
}

function hasMargins() { const m = margins(); return m.left + m.top + m.right + m.bottom > 0; }

function showSizeInfo() {
  sizeFollowsPicture(pic.loaded);
  if (!pic.loaded) return;
  const m = margins(), w = $("picture").width + m.left + m.right, h = $("picture").height + m.top + m.bottom;
  const cw = w - (w % 16), ch = h - (h % 16);
  const note = w % 16 || h % 16 ? ` (the server crops it to ${cw}x${ch}: sides are multiples of 16)` : "";
  // said before sending (the server refuses it too, and its message is shown): the model's sides are 256..2048
  const bad = Math.min(cw, ch) < MIN_SIDE || Math.max(cw, ch) > MAX_SIDE ? ` Too ${Math.max(cw, ch) > MAX_SIDE
    ? "large" : "small"}: each side must be ${MIN_SIDE}..${MAX_SIDE} px.` : "";
  $("image-info").textContent = `sends a ${w}x${h} picture; the images are that size${note}` +
    (pic.scaled ? `; scaled down to fit ${MAX_SIDE} px` : "") + `. Paint on it to repaint only there.${bad}`;
  $("image-info").classList.toggle("error", Boolean(bad));
}

// The larger picture of an outpaint. The new area is filled by stretching the picture's edge pixels outwards
// (each border row/column smeared across its margin, the corners with the corner pixel): the mask makes it
// white (repainted, at strength 1.0 from noise), so the fill only nudges what the model starts from, and the
// picture's own edge colours continue the scene where flat grey would pull the new area's tones towards grey.
function paddedPicture(m) {
  const src = $("picture"), w = src.width, h = src.height;
  const c = document.createElement("canvas");
  c.width = w + m.left + m.right;
  c.height = h + m.top + m.bottom;
  const ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = false;  // a 1-pixel strip stretched: its own colour, not blended with a neighbour
  const strip = (sx, sy, sw, sh, dx, dy, dw, dh) => { if (dw > 0 && dh > 0) ctx.drawImage(src, sx, sy, sw, sh, dx, dy, dw, dh); };
  const x2 = m.left + w, y2 = m.top + h;
  strip(0, 0, 1, h, 0, m.top, m.left, h);                 // left
  strip(w - 1, 0, 1, h, x2, m.top, m.right, h);           // right
  strip(0, 0, w, 1, m.left, 0, w, m.top);                 // top
  strip(0, h - 1, w, 1, m.left, y2, w, m.bottom);         // bottom
  strip(0, 0, 1, 1, 0, 0, m.left, m.top);                 // corners
  strip(w - 1, 0, 1, 1, x2, 0, m.right, m.top);
  strip(0, h - 1, 1, 1, 0, y2, m.left, m.bottom);
  strip(w - 1, h - 1, 1, 1, x2, y2, m.right, m.bottom);
  ctx.drawImage(src, m.left, m.top);
  return c;
}

// The mask sent: black and white, opaque (an opaque mask is read white = repaint), at the sent picture's size:
// the margins white, the original area black but where painted.
function maskPicture(m, bits) {
  const w = $("picture").width, h = $("picture").height;
  const c = document.createElement("canvas");
  c.width = w + m.left + m.right;
  c.height = h + m.top + m.bottom;
  const ctx = c.getContext("2d");
  const out = ctx.createImageData(c.width, c.height);
  for (let y = 0; y < c.height; y++) {
    for (let x = 0; x < c.width; x++) {
      const ox = x - m.left, oy = y - m.top;
      const inside = ox >= 0 && oy >= 0 && ox < w && oy < h;
      const v = !inside || bits[oy * w + ox] ? 255 : 0;
      const i = 4 * (y * c.width + x);
      out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
      out.data[i + 3] = 255;
    }
  }
  ctx.putImageData(out, 0, 0);
  return c;
}

// ------------------------------------------------------------------ the request's fields
// {} without a picture; else image (and mask) as data: URLs, strength, and size "auto" (the picture's size)
function pictureFields() {
  if (!pic.loaded) return {};
  const m = margins(), bits = maskBits();
  const fields = { size: "auto", strength: Number($("strength").value), image: paddedPicture(m).toDataURL("image/png") };
  if (hasMargins() || bits.includes(1)) {
    fields.mask = maskPicture(m, bits).toDataURL("image/png");
    const blur = Number($("mask-blur").value);  // only with a mask: without one the server refuses mask_blur
    if (blur > 0) fields.mask_blur = blur;
  }
  return fields;
}

// ------------------------------------------------------------------ wiring
function setupPicture() {
  $("image-file").addEventListener("change", () => { const f = $("image-file").files[0]; if (f) usePicture(f); });
  $("image-remove").addEventListener("click", removePicture);
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    const f = ev.dataTransfer.files[0];
    if (f) usePicture(f);
  });
  const mask = $("mask");
  mask.addEventListener("pointerdown", onPointerDown);
  mask.addEventListener("pointermove", onPointerMove);
  mask.addEventListener("pointerup", onPointerUp);
  mask.addEventListener("pointercancel", onPointerUp);
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-invert").addEventListener("click", invertMask);
  $("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; });
  $("strength").addEventListener("input", () => { pic.strengthTouched = true; maskChanged(); });
  for (const side of ["left", "top", "right", "bottom"]) $(`pad-${side}`).addEventListener("input", maskChanged);
  showStrength();
}

setupPicture();
