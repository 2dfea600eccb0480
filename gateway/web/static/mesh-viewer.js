// 3D review of a design mesh in the web console (ES module, no inline script needed).
//
//   <link rel="stylesheet" href="/static/mesh-viewer.css">
//   <script type="module" src="/static/mesh-viewer.js"></script>
//   <div class="mesh-viewer" data-mesh-url="/designs/<id>/mesh.json"></div>
//   (optional data-aspect="0.6": canvas height / width, default 0.75)
//
// Every div.mesh-viewer[data-mesh-url] in the page, and in content htmx swaps in later
// (htmx:load), is filled with a WebGL canvas. The URL must be same-origin and answer
// JSON made by gateway.fidelity.mesh_view.mesh_view_json:
//
//   {"positions": [x, y, z, ...],  float, mm, 3 per vertex
//    "indices":   [i, j, k, ...],  int, 0-based, 3 per triangle
//    "bbox": [[minx, miny, minz], [maxx, maxy, maxz]],
//    optional: "triangles", "source_triangles", "decimated", "unit"}
//
// Works under `script-src 'self'; style-src 'self'; connect-src 'self'`: no inline
// script, no <style>, no eval; sizes are set through the CSSOM (element.style), which
// style-src does not govern. Errors are written into the element as text.
// The element gets data-mesh-viewer-state = "loading" | "ready" | "error" and fires
// "mesh-viewer:ready" / "mesh-viewer:error" (bubbling) when done.
// Z is up (CAD convention of STL/3MF design files); the grid lies under the part.

import * as THREE from './vendor/three.module.js';
import { OrbitControls } from './vendor/OrbitControls.js';

const SELECTOR = 'div.mesh-viewer[data-mesh-url]';
const disposers = new WeakMap();

export function initMeshViewers(root = document) {
  const found = [];
  if (root instanceof Element && root.matches(SELECTOR)) found.push(root);
  if (root.querySelectorAll) found.push(...root.querySelectorAll(SELECTOR));
  for (const element of found) {
    if (!element.dataset.meshViewerState) {
      element.dataset.meshViewerState = 'loading';
      start(element);
    }
  }
}

function text(tag, className, content) {
  const node = document.createElement(tag);
  node.className = className;
  if (content !== undefined) node.textContent = content;
  return node;
}

function fail(element, message) {
  let box = element.querySelector('.mesh-viewer-error');
  if (!box) {
    box = text('p', 'mesh-viewer-error');
    box.setAttribute('role', 'alert');
    element.append(box);
  }
  box.textContent = `3D view unavailable: ${message}`;
  element.dataset.meshViewerState = 'error';
  element.dispatchEvent(new CustomEvent('mesh-viewer:error', { bubbles: true, detail: { message } }));
}

async function start(element) {
  const status = text('p', 'mesh-viewer-status', 'Loading mesh…');
  element.append(status);
  try {
    const mesh = await load(element.dataset.meshUrl);
    status.remove();
    show(element, mesh);
    element.dataset.meshViewerState = 'ready';
    element.dispatchEvent(new CustomEvent('mesh-viewer:ready', { bubbles: true }));
  } catch (error) {
    status.remove();
    fail(element, error instanceof Error ? error.message : String(error));
  }
}

async function load(url) {
  const target = new URL(url, document.baseURI);
  if (target.origin !== window.location.origin) {
    throw new Error('the mesh URL is not on this site');
  }
  const response = await fetch(target, {
    credentials: 'same-origin',
    headers: { Accept: 'application/json' },
  });
  if (!response.ok) {
    let detail = '';
    try {
      detail = (await response.text()).slice(0, 300).trim();
    } catch {
      // no body
    }
    throw new Error(`the server answered ${response.status} ${response.statusText}${detail ? `: ${detail}` : ''}`);
  }
  let data;
  try {
    data = await response.json();
  } catch {
    throw new Error('the server did not answer JSON');
  }
  return checked(data);
}

function checked(data) {
  const { positions, indices, bbox } = data ?? {};
  if (!Array.isArray(positions) || positions.length === 0 || positions.length % 3 !== 0) {
    throw new Error('the mesh has no positions (a flat list of x, y, z)');
  }
  if (!Array.isArray(indices) || indices.length === 0 || indices.length % 3 !== 0) {
    throw new Error('the mesh has no triangles (a flat list of vertex indices)');
  }
  const vertices = positions.length / 3;
  const position = Float32Array.from(positions);
  if (!position.every(Number.isFinite)) throw new Error('a vertex coordinate is not a finite number');
  const index = vertices > 65535 ? Uint32Array.from(indices) : Uint16Array.from(indices);
  for (let i = 0; i < indices.length; i += 1) {
    const v = indices[i];
    if (!Number.isInteger(v) || v < 0 || v >= vertices) {
      throw new Error(`triangle ${Math.floor(i / 3)} refers to vertex ${v}, but there are ${vertices}`);
    }
  }
  const box = new THREE.Box3();
  if (Array.isArray(bbox) && bbox.length === 2 && bbox.flat().length === 6 && bbox.flat().every(Number.isFinite)) {
    box.set(new THREE.Vector3(...bbox[0]), new THREE.Vector3(...bbox[1]));
  } else {
    box.setFromArray(position);
  }
  return {
    position,
    index,
    box,
    triangles: indices.length / 3,
    sourceTriangles: Number.isInteger(data.source_triangles) ? data.source_triangles : indices.length / 3,
    decimated: data.decimated === true,
    unit: typeof data.unit === 'string' ? data.unit : 'mm',
  };
}

function show(element, mesh) {
  const geometry = new THREE.BufferGeometry();
  geometry.setAttribute('position', new THREE.BufferAttribute(mesh.position, 3));
  geometry.setIndex(new THREE.BufferAttribute(mesh.index, 1));
  geometry.computeVertexNormals();
  geometry.computeBoundingSphere();

  let renderer;
  try {
    renderer = new THREE.WebGLRenderer({ antialias: true });
  } catch (error) {
    geometry.dispose();
    throw new Error(`this browser cannot draw WebGL (${error instanceof Error ? error.message : error})`);
  }
  renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
  const canvas = renderer.domElement;
  canvas.className = 'mesh-viewer-canvas';
  canvas.style.display = 'block';
  canvas.setAttribute('role', 'img');

  const size = mesh.box.getSize(new THREE.Vector3());
  const center = mesh.box.getCenter(new THREE.Vector3());
  const radius = Math.max(size.length() / 2, 1e-3);
  const unit = mesh.unit;
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(2));
  canvas.setAttribute(
    'aria-label',
    `3D view of the design: ${mesh.triangles} triangles, ${fmt(size.x)} × ${fmt(size.y)} × ${fmt(size.z)} ${unit}`,
  );

  const scene = new THREE.Scene();
  scene.background = new THREE.Color(0xf4f5f7);
  const material = new THREE.MeshStandardMaterial({
    color: 0x8fa8c8,
    metalness: 0.1,
    roughness: 0.6,
    flatShading: true, // each triangle as it is in the file
    side: THREE.DoubleSide, // open or inside-out meshes stay visible
  });
  const part = new THREE.Mesh(geometry, material);
  scene.add(part);

  scene.add(new THREE.HemisphereLight(0xffffff, 0x6b7280, 1.6));
  const camera = new THREE.PerspectiveCamera(40, 4 / 3, radius / 100, radius * 100);
  camera.up.set(0, 0, 1);
  const headlight = new THREE.DirectionalLight(0xffffff, 1.8);
  headlight.position.set(1, 1, 2);
  camera.add(headlight);
  scene.add(camera);

  // ground grid under the part (XY plane at its lowest z), axes at the origin
  const spacing = 10 ** Math.floor(Math.log10(Math.max(size.x, size.y, 1e-3) / 2));
  const extent = Math.ceil((Math.max(size.x, size.y) * 1.5) / spacing) * spacing;
  const grid = new THREE.GridHelper(extent, Math.max(2, Math.round(extent / spacing)), 0x9ca3af, 0xd1d5db);
  grid.rotation.x = Math.PI / 2;
  grid.position.set(center.x, center.y, mesh.box.min.z);
  scene.add(grid);
  const axes = new THREE.AxesHelper(radius * 0.6);
  scene.add(axes);

  const controls = new OrbitControls(camera, canvas);
  const render = () => renderer.render(scene, camera);
  controls.addEventListener('change', render);

  const fit = () => {
    const distance = radius / Math.sin(THREE.MathUtils.degToRad(camera.fov / 2)) * 1.15;
    const direction = new THREE.Vector3(1, -1.4, 0.9).normalize();
    camera.position.copy(center).addScaledVector(direction, distance);
    camera.near = distance / 100;
    camera.far = distance * 100;
    camera.updateProjectionMatrix();
    controls.target.copy(center);
    controls.minDistance = radius / 50;
    controls.maxDistance = distance * 20;
    controls.update();
    render();
  };

  // width follows the element; height = width × data-aspect (default 0.75), so that the
  // canvas never feeds back into the size it is computed from
  const aspect = Number.parseFloat(element.dataset.aspect) > 0 ? Number.parseFloat(element.dataset.aspect) : 0.75;
  let shownWidth = 0;
  const resize = () => {
    const width = Math.max(Math.floor(element.clientWidth), 1);
    if (width === shownWidth) return;
    shownWidth = width;
    const height = Math.max(Math.round(width * aspect), 1);
    renderer.setSize(width, height); // sets canvas.style.width/height: CSSOM, allowed by CSP
    camera.aspect = width / height;
    camera.updateProjectionMatrix();
    render();
  };

  const toolbar = text('div', 'mesh-viewer-toolbar');
  const wire = text('button', 'mesh-viewer-wireframe', 'Wireframe');
  wire.type = 'button';
  wire.setAttribute('aria-pressed', 'false');
  wire.addEventListener('click', () => {
    material.wireframe = !material.wireframe;
    wire.setAttribute('aria-pressed', String(material.wireframe));
    render();
  });
  const reset = text('button', 'mesh-viewer-reset', 'Reset view');
  reset.type = 'button';
  reset.addEventListener('click', fit);
  let summary = `${mesh.triangles.toLocaleString()} triangles · ${fmt(size.x)} × ${fmt(size.y)} × ${fmt(size.z)} ${unit}`;
  if (mesh.decimated) {
    summary += ` · simplified for display from ${mesh.sourceTriangles.toLocaleString()} triangles`;
  }
  const info = text('span', 'mesh-viewer-info', summary);
  if (mesh.decimated) info.classList.add('mesh-viewer-decimated');
  toolbar.append(wire, reset, info);

  element.append(toolbar, canvas);
  canvas.addEventListener('webglcontextlost', (event) => {
    event.preventDefault();
    fail(element, 'the graphics context was lost; reload the page');
  });
  const observer = new ResizeObserver(resize);
  observer.observe(element);
  resize();
  fit();

  disposers.set(element, () => {
    observer.disconnect();
    controls.dispose();
    geometry.dispose();
    material.dispose();
    grid.dispose();
    axes.dispose();
    renderer.dispose();
  });
}

function dispose(root) {
  const elements = root instanceof Element && root.matches(SELECTOR) ? [root] : [];
  if (root.querySelectorAll) elements.push(...root.querySelectorAll(SELECTOR));
  for (const element of elements) {
    const done = disposers.get(element);
    if (done) {
      disposers.delete(element);
      done();
    }
  }
}

// htmx: viewers in swapped-in content start, viewers in removed content free their GL context
document.addEventListener('htmx:load', (event) => initMeshViewers(event.target));
document.addEventListener('htmx:beforeCleanupElement', (event) => dispose(event.target));

if (document.readyState === 'loading') {
  document.addEventListener('DOMContentLoaded', () => initMeshViewers(document));
} else {
  initMeshViewers(document);
}
