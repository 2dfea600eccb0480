// Signs a prepared case record in the person's browser (ES module, no inline script).
//
//   <section id="case-sign" data-record="BASE64 of the canonical record bytes">
//     <input type="file" id="key-file"> <button id="sign-button"> <p id="sign-status">
//     <form id="sign-form"> with hidden _csrf, record, signature </form>
//   </section>
//
// The person picks their key file (<id>.key: PEM, PKCS#8, EC P-256, as `yigong pki`
// issues it). It is read here (FileReader), imported with WebCrypto as a non-extractable
// signing key, and the record bytes are signed with ECDSA P-256 / SHA-256. WebCrypto
// gives the signature as 64 bytes r||s; the node converts it to DER and checks it
// against the certificate of the TLS connection, as for `yigong case sign`. Only the
// record bytes and the signature are posted: the key never leaves the browser.
// The section gets data-sign-state = "signing" | "error" | "submitted".

const section = document.getElementById('case-sign');
if (section) setUp(section);

function setUp(root) {
  const button = root.querySelector('#sign-button');
  const input = root.querySelector('#key-file');
  const status = root.querySelector('#sign-status');
  const form = root.querySelector('#sign-form');
  button.addEventListener('click', async () => {
    status.classList.remove('error');
    const file = input.files && input.files[0];
    if (!file) {
      fail(root, status, 'Pick your key file first.');
      return;
    }
    button.disabled = true;
    root.dataset.signState = 'signing';
    status.textContent = 'Signing in this browser…';
    try {
      const pem = await readText(file);
      const key = await importKey(pem);
      const record = fromBase64(root.dataset.record);
      const sig = await crypto.subtle.sign({ name: 'ECDSA', hash: 'SHA-256' }, key, record);
      form.elements.signature.value = toBase64(new Uint8Array(sig));
      root.dataset.signState = 'submitted';
      status.textContent = 'Signed; submitting the record and the signature…';
      form.submit();
    } catch (err) {
      button.disabled = false;
      fail(root, status, err && err.message ? err.message : String(err));
    }
  });
}

function fail(root, status, message) {
  root.dataset.signState = 'error';
  status.classList.add('error');
  status.textContent = message;
}

function readText(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(new Error('The key file could not be read.'));
    reader.readAsText(file);
  });
}

async function importKey(pem) {
  const m = /-----BEGIN PRIVATE KEY-----([\s\S]+?)-----END PRIVATE KEY-----/.exec(pem);
  if (!m) {
    if (pem.includes('BEGIN ENCRYPTED PRIVATE KEY')) {
      throw new Error('This key file is encrypted; use the unencrypted PKCS#8 key (<id>.key).');
    }
    throw new Error('This is not a PEM PKCS#8 private key (-----BEGIN PRIVATE KEY-----): pick your <id>.key file.');
  }
  const der = fromBase64(m[1].replace(/\s+/g, ''));
  try {
    return await crypto.subtle.importKey(
      'pkcs8', der, { name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']);
  } catch (err) {
    throw new Error('The key could not be used: it must be an EC P-256 private key.');
  }
}

function fromBase64(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function toBase64(bytes) {
  let bin = '';
  for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
  return btoa(bin);
}
