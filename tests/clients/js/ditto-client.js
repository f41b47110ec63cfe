// Drives the official Eclipse Ditto JavaScript client (npm @eclipse-ditto/ditto-javascript-client-node)
// against a running twinstore, unmodified. Run by tests/clients/test_js_client.py.
//
// Environment: TWINSTORE_DOMAIN (host:port), TWINSTORE_USER, TWINSTORE_PASSWORD, TWINSTORE_NAMESPACE
// (unique per run, so search results contain only this run's things).
//
// Every step checks what the client returned and records it; the result is one JSON object on
// stdout. Any failed check, rejected promise or timeout exits with status 1 (the error on stderr).
'use strict';

const {
  DittoNodeClient,
  NodeHttpBasicAuth,
  NodeHttpBearerAuth,
  DefaultTokenSupplier,
  NodeWebSocketBasicAuth,
  DefaultSearchOptions,
  DefaultCountOptions,
  DefaultFieldsOptions,
  DefaultMatchOptions,
  Policy,
  Resource,
  Subject,
  Thing,
  Feature,
  BasicErrorResponse,
} = require('@eclipse-ditto/ditto-javascript-client-node');

const domain = process.env.TWINSTORE_DOMAIN || '127.0.0.1:8080';
const user = process.env.TWINSTORE_USER || 'ditto';
const password = process.env.TWINSTORE_PASSWORD || 'ditto';
const ns = process.env.TWINSTORE_NAMESPACE || 'org.jsclient';
// With a JWT, only the bearer-token run (bearer()) is made.
const token = process.env.TWINSTORE_TOKEN;
let closing = false;  // set just before the script closes a WebSocket client itself

const results = {};

function check(condition, message, actual) {
  if (!condition) {
    throw new Error(`${message}: ${JSON.stringify(actual)}`);
  }
}

function deepEqual(a, b) {
  return JSON.stringify(sortKeys(a)) === JSON.stringify(sortKeys(b));
}

function sortKeys(v) {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v && typeof v === 'object') {
    return Object.fromEntries(Object.keys(v).sort().map(k => [k, sortKeys(v[k])]));
  }
  return v;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function step(name, fn) {
  try {
    results[name] = await withTimeout(Promise.resolve().then(fn), 20000, name);
  } catch (error) {
    const detail = error instanceof Error ? error.stack : JSON.stringify(error);
    throw new Error(`step ${name} failed: ${detail}`);
  }
}

function errorOf(promise) {
  // Over HTTP the client rejects with a BasicErrorResponse (status and Ditto's error body), over
  // the WebSocket with the error envelope's value (Ditto's error body); both as {status, body}.
  return promise.then(
    value => ({ resolved: true, value }),
    error => {
      if (error instanceof BasicErrorResponse) {
        return { resolved: false, error: { status: error.status, body: error.body } };
      }
      if (error instanceof Error) {
        return { resolved: false, error: { status: null, body: String(error) } };
      }
      return { resolved: false, error: { status: error && error.status, body: error } };
    },
  );
}

async function http() {
  const client = DittoNodeClient.newHttpClient()
    .withoutTls()
    .withDomain(domain)
    .withAuthProvider(NodeHttpBasicAuth.newInstance(user, password))
    .build();
  const things = client.getThingsHandle();
  const search = client.getSearchHandle();
  const thingId = `${ns}:http-1`;
  const features = client.getFeaturesHandle(thingId);

  await step('http_create', async () => {
    const thing = new Thing(thingId, undefined, { site: 'north', floor: 1 }, undefined);
    const r = await things.putThing(thing);
    check(r.status === 201, 'putThing of a new thing is 201', r.status);
    check(r.body && r.body.thingId === thingId, 'putThing answers the created thing', r.body);
    return { status: r.status, thingId: r.body.thingId, policyId: r.body.policyId };
  });

  await step('http_read', async () => {
    const thing = await things.getThing(thingId);
    check(thing.thingId === thingId, 'getThing returns the thing', thing);
    check(deepEqual(thing.attributes, { site: 'north', floor: 1 }), 'attributes as created', thing.attributes);
    const fields = await things.getThing(thingId, DefaultFieldsOptions.getInstance().withFields('attributes/site'));
    check(deepEqual(fields.attributes, { site: 'north' }), 'fields selects attributes/site', fields);
    const site = await things.getAttribute(thingId, 'site');
    check(site === 'north', 'getAttribute', site);
    return { thingId: thing.thingId, attributes: thing.attributes, fields: fields.attributes, site };
  });

  await step('http_modify', async () => {
    const attr = await things.putAttribute(thingId, 'floor', 2);
    check(attr.status === 204, 'putAttribute of an existing attribute is 204', attr.status);
    const newAttr = await things.putAttribute(thingId, 'location/room', 'r1');
    check(newAttr.status === 201, 'putAttribute of a new attribute is 201', newAttr.status);
    const feature = await features.putFeature(new Feature('temp', undefined, { value: 20 }));
    check(feature.status === 201, 'putFeature of a new feature is 201', feature.status);
    const prop = await features.putProperty('temp', 'value', 21.5);
    check(prop.status === 204, 'putProperty of an existing property is 204', prop.status);
    const value = await features.getProperty('temp', 'value');
    check(value === 21.5, 'getProperty after putProperty', value);
    const floor = await things.getAttribute(thingId, 'floor');
    check(floor === 2, 'getAttribute after putAttribute', floor);
    return {
      putAttribute: attr.status, putNewAttribute: newAttr.status, putFeature: feature.status,
      putProperty: prop.status, property: value, floor,
    };
  });

  await step('http_merge', async () => {
    const patch = Thing.fromObject({ thingId, attributes: { floor: null, merged: true } });
    const r = await things.patchThing(patch);
    check(r.status === 204, 'patchThing is 204', r.status);
    const attrs = await things.patchAttributes(thingId, { location: { building: 'b7' } });
    check(attrs.status === 204, 'patchAttributes is 204', attrs.status);
    const props = await features.patchProperties('temp', { unit: 'C' });
    check(props.status === 204, 'patchProperties is 204', props.status);
    const thing = await things.getThing(thingId);
    return {
      patchThing: r.status, patchAttributes: attrs.status, patchProperties: props.status,
      attributes: thing.attributes, properties: thing.toObject().features.temp.properties,
    };
  });

  await step('http_post_and_list', async () => {
    const created = await things.postThing({ attributes: { site: 'north', generated: true } });
    check(typeof created.thingId === 'string' && created.thingId.includes(':'), 'postThing generates an id', created);
    const list = await things.getThings([thingId, created.thingId]);
    check(list.length === 2 && list[0].thingId === thingId && list[1].thingId === created.thingId,
      'getThings in the order asked', list.map(t => t.thingId));
    await things.deleteThing(created.thingId);
    return { generated: created.thingId.split(':')[0], listed: list.map(t => t.thingId) };
  });

  await step('http_search', async () => {
    for (let i = 2; i <= 4; i++) {
      await things.putThing(new Thing(`${ns}:http-${i}`, undefined, { site: i % 2 ? 'north' : 'south', n: i }));
    }
    const filter = 'eq(attributes/site,"north")';
    const page = await search.search(
      DefaultSearchOptions.getInstance().withNamespaces(ns).withRawFilter(filter).withSort('+thingId'),
    );
    const ids = page.items.map(t => t.thingId);
    check(deepEqual(ids, [`${ns}:http-1`, `${ns}:http-3`]), 'search finds the north things', ids);
    const firstPage = await search.search(
      DefaultSearchOptions.getInstance().withNamespaces(ns).withRawFilter('gt(attributes/n,1)')
        .withSort('-thingId').withPageSize(1).withFields('thingId', 'attributes/n'),
    );
    check(firstPage.items.length === 1 && firstPage.items[0].thingId === `${ns}:http-4`,
      'sorted page of size 1', firstPage.items);
    check(typeof firstPage.cursor === 'string' && firstPage.cursor.length > 0, 'a cursor to the next page', firstPage.cursor);
    const secondPage = await search.search(
      DefaultSearchOptions.getInstance().withNamespaces(ns).withRawFilter('gt(attributes/n,1)')
        .withSort('-thingId').withPageSize(1).withCursor(firstPage.cursor),
    );
    check(secondPage.items.length === 1 && secondPage.items[0].thingId === `${ns}:http-3`,
      'the cursor continues the search', secondPage.items);
    const posted = await search.postSearch(
      DefaultSearchOptions.getInstance().withNamespaces(ns).withRawFilter('eq(attributes/site,"south")'),
    );
    const postedIds = posted.items.map(t => t.thingId);
    check(deepEqual(postedIds, [`${ns}:http-2`, `${ns}:http-4`]), 'postSearch (form body)', postedIds);
    // the deprecated limit(offset,count) still works, with nextPageOffset (-1 after the last page)
    const limited = await search.search(
      DefaultSearchOptions.getInstance().withNamespaces(ns).withSort('+thingId').withLimit(1, 2),
    );
    const limitedIds = limited.items.map(t => t.thingId);
    check(deepEqual(limitedIds, [`${ns}:http-2`, `${ns}:http-3`]) && limited.nextPageOffset === 3,
      'withLimit(1,2) pages by offset', { limitedIds, next: limited.nextPageOffset });
    const last = await search.search(
      DefaultSearchOptions.getInstance().withNamespaces(ns).withSort('+thingId').withLimit(3, 2),
    );
    check(last.items.length === 1 && last.nextPageOffset === -1, 'the last offset page', last.nextPageOffset);
    return {
      ids, firstPage: firstPage.items.map(t => t.toObject()), secondPage: secondPage.items.map(t => t.thingId),
      posted: postedIds, limited: limitedIds,
    };
  });

  await step('http_count', async () => {
    const count = await search.count(
      DefaultCountOptions.getInstance().withNamespaces(ns).withRawFilter('eq(attributes/site,"north")'),
    );
    check(count === 2, 'count of north things', count);
    const all = await search.count(DefaultCountOptions.getInstance().withNamespaces(ns));
    check(all === 4, 'count without a filter', all);
    const posted = await search.postCount(
      DefaultCountOptions.getInstance().withNamespaces(ns).withRawFilter('ge(attributes/n,3)'),
    );
    check(posted === 2, 'postCount (form body)', posted);
    return { north: count, all, posted };
  });

  await step('http_preconditions', async () => {
    const id = `${ns}:etag-1`;
    const created = await things.putThing(new Thing(id, undefined, { a: 1 }));
    const etag = created.headers.get('etag');
    check(etag === '"rev:1"', 'a created thing\'s ETag', etag);
    const ok = await things.putAttribute(id, 'a', 2, DefaultMatchOptions.getInstance().ifMatch(etag));
    check(ok.status === 204, 'If-Match with the current ETag writes', ok.status);
    const stale = await errorOf(things.putAttribute(id, 'a', 3, DefaultMatchOptions.getInstance().ifMatch(etag)));
    check(!stale.resolved && stale.error.status === 412 && stale.error.body.error === 'things:precondition.failed',
      'If-Match with a stale ETag is 412', stale);
    const exists = await errorOf(things.putThing(new Thing(id), DefaultMatchOptions.getInstance().ifNoneMatchAny()));
    check(!exists.resolved && exists.error.status === 412, 'If-None-Match: * on an existing thing is 412', exists);
    const value = await things.getAttribute(id, 'a');
    check(value === 2, 'a refused write changes nothing', value);
    await things.deleteThing(id);
    return { etag, ifMatch: ok.status, stale: stale.error.status, ifNoneMatch: exists.error.status, value };
  });

  await step('http_definitions', async () => {
    const id = `${ns}:def-1`;
    await things.putThing(new Thing(id));
    const put = await things.putDefinition(id, 'org.acme:pump:1.0.0');
    check(put.status === 201, 'putDefinition of a new definition is 201', put.status);
    const definition = await things.getDefinition(id);
    const policyId = await things.getPolicyId(id);
    const missing = await errorOf(client.getFeaturesHandle(id).putDefinition('motor', ['org.acme:motor:1.0.0']));
    check(!missing.resolved && missing.error.body.error === 'things:feature.notfound',
      'the definition of a missing feature is 404 (as Ditto)', missing);
    await client.getFeaturesHandle(id).putFeature(new Feature('motor'));
    const featureDefinition = await client.getFeaturesHandle(id).putDefinition('motor', ['org.acme:motor:1.0.0']);
    check(featureDefinition.status === 201, 'putDefinition of a feature', featureDefinition.status);
    const feature = await client.getFeaturesHandle(id).getFeature('motor');
    const deleted = await things.deleteDefinition(id);
    check(deleted.status === 204, 'deleteDefinition is 204', deleted.status);
    await things.deleteThing(id);
    return { definition, policyId: policyId === id, featureDefinition: feature.definition };
  });

  await step('http_policies', async () => {
    const policies = client.getPoliciesHandle();
    const policyId = `${ns}:policy-1`;
    const rights = { grant: ['READ', 'WRITE'], revoke: [] };
    const policy = Policy.fromObject({
      entries: { owner: { subjects: { [`nginx:${user}`]: { type: 'test' } }, resources: { 'thing:/': rights, 'policy:/': rights } } },
    }, policyId);
    const put = await policies.putPolicy(policy);
    check(put.status === 201, 'putPolicy of a new policy is 201', put.status);
    const subject = await policies.putSubject(policyId, 'owner', Subject.fromObject({ type: 'test' }, 'nginx:someone'));
    check(subject.status === 201, 'putSubject is 201', subject.status);
    const resource = await policies.putResource(policyId, 'owner',
      Resource.fromObject({ grant: ['READ'], revoke: [] }, 'thing:/features/secret'));
    check(resource.status === 201, 'putResource is 201', resource.status);
    const entry = (await policies.getEntry(policyId, 'owner')).toObject();
    check(Object.keys(entry.subjects).sort().join() === `nginx:${user},nginx:someone`, 'the entry\'s subjects', entry);
    const thing = await things.putThing(new Thing(`${ns}:guarded`, policyId, { a: 1 }));
    check(thing.status === 201 && thing.body.policyId === policyId, 'a thing under the policy', thing.body);
    await things.deleteThing(`${ns}:guarded`);
    const deleted = await policies.deletePolicy(policyId);
    check(deleted.status === 204, 'deletePolicy is 204', deleted.status);
    const gone = await errorOf(policies.getPolicy(policyId));
    check(!gone.resolved && gone.error.body.error === 'policies:policy.notfound', 'a deleted policy is not found', gone);
    return { putPolicy: put.status, putSubject: subject.status, putResource: resource.status,
      resources: Object.keys(entry.resources).sort(), deletePolicy: deleted.status };
  });

  await step('http_delete', async () => {
    const attr = await things.deleteAttribute(thingId, 'merged');
    check(attr.status === 204, 'deleteAttribute is 204', attr.status);
    const r = await things.deleteThing(thingId);
    check(r.status === 204, 'deleteThing is 204', r.status);
    const gone = await errorOf(things.getThing(thingId));
    check(!gone.resolved, 'getThing of a deleted thing is rejected', gone);
    const error = gone.error.body;
    check(gone.error.status === 404 && error && error.status === 404 && error.error === 'things:thing.notfound',
      'the rejection carries Ditto\'s error body', gone.error);
    const count = await search.count(DefaultCountOptions.getInstance().withNamespaces(ns));
    check(count === 3, 'search no longer counts the deleted thing', count);
    return { deleteAttribute: attr.status, deleteThing: r.status, error: error.error, status: error.status, count };
  });

  return { client, things };
}

async function waitFor(list, predicate, what, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const found = list.find(predicate);
    if (found !== undefined) return found;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise(resolve => setTimeout(resolve, 20));
  }
}

async function websocket(http) {
  const client = DittoNodeClient.newWebSocketClient()
    .withoutTls()
    .withDomain(domain)
    .withAuthProvider(NodeWebSocketBasicAuth.newInstance(user, password))
    .withBuffer(16)
    .twinChannel()
    .withReconnect(false)
    .build();
  const things = client.getThingsHandle();
  const events = client.getEventsHandle();
  const thingId = `${ns}:ws-1`;
  try {
    await step('ws_create', async () => {
      const thing = Thing.fromObject({
        thingId, attributes: { site: 'west' }, features: { temp: { properties: { value: 20 } } },
      });
      const r = await things.createThing(thing);
      check(r.status === 201, 'createThing over WebSocket is 201', r.status);
      check(r.body && r.body.thingId === thingId, 'createThing answers the thing', r.body);
      return { status: r.status, thingId: r.body.thingId };
    });

    await step('ws_retrieve', async () => {
      const thing = await things.getThing(thingId);
      check(thing.thingId === thingId && deepEqual(thing.attributes, { site: 'west' }),
        'getThing over WebSocket', thing);
      const value = await client.getFeaturesHandle(thingId).getProperty('temp', 'value');
      check(value === 20, 'getProperty over WebSocket', value);
      const site = await things.getAttribute(thingId, 'site');
      check(site === 'west', 'getAttribute over WebSocket', site);
      return { thingId: thing.thingId, attributes: thing.attributes, site, property: value };
    });

    await step('ws_modify', async () => {
      const r = await things.putAttribute(thingId, 'level', 3);
      check(r.status === 201, 'putAttribute of a new attribute over WebSocket is 201', r.status);
      const merged = await things.patchAttributes(thingId, { site: 'east' });
      check(merged.status === 204, 'patchAttributes over WebSocket is 204', merged.status);
      const thing = await things.getThing(thingId);
      check(deepEqual(thing.attributes, { site: 'east', level: 3 }), 'attributes after modify and merge', thing.attributes);
      return { putAttribute: r.status, patchAttributes: merged.status, attributes: thing.attributes };
    });

    await step('ws_features', async () => {
      const features = client.getFeaturesHandle(thingId);
      const missing = await errorOf(features.putProperty('motor', 'rpm', 1));
      check(!missing.resolved && missing.error.body.error === 'things:feature.notfound',
        'a property of a missing feature over WebSocket is 404', missing);
      const put = await features.putFeature(new Feature('motor', undefined, { rpm: 0 }));
      check(put.status === 201, 'putFeature over WebSocket is 201', put.status);
      const prop = await features.putProperty('motor', 'rpm', 1200);
      check(prop.status === 204, 'putProperty over WebSocket is 204', prop.status);
      const merged = await features.patchProperties('motor', { on: true });
      check(merged.status === 204, 'patchProperties over WebSocket is 204', merged.status);
      const motor = (await features.getFeature('motor')).toObject();
      const deleted = await features.deleteFeature('motor');
      check(deleted.status === 204, 'deleteFeature over WebSocket is 204', deleted.status);
      return { missing: missing.error.status, putFeature: put.status, putProperty: prop.status,
        patchProperties: merged.status, properties: motor.properties, deleteFeature: deleted.status };
    });

    await step('ws_events', async () => {
      await events.requestEvents();
      const thingEvents = [];
      const propertyEvents = [];
      const allEvents = [];
      events.subscribeToThing(thingId, message => thingEvents.push(message));
      events.subscribeToProperty(thingId, 'temp', 'value', message => propertyEvents.push(message));
      events.subscribeToAllEvents(message => allEvents.push(message));
      const summary = m => ({ topic: m.topic, action: m.action, path: m.path, value: m.value });

      // An event of a change acknowledged just before START-SEND-EVENTS may still arrive first
      // (see the README); everything from the first change made after the subscription on must
      // arrive exactly once, in order.
      const put = await http.things.putAttribute(thingId, 'level', 4);
      check(put.status === 204, 'putAttribute over HTTP while subscribed', put.status);
      const modified = await waitFor(thingEvents, m => m.path === '/attributes/level' && m.value === 4,
        'the attribute event');
      const since = thingEvents.indexOf(modified);
      const after = () => thingEvents.slice(since);
      check(modified.topic === `${ns}/ws-1/things/twin/events/modified` && modified.action === 'modified',
        'the modified event', summary(modified));
      check(modified.headers && typeof modified.headers === 'object', 'the event carries headers', modified);

      const features = http.client.getFeaturesHandle(thingId);
      const prop = await features.putProperty('temp', 'value', 31);
      check(prop.status === 204, 'putProperty over HTTP while subscribed', prop.status);
      const property = await waitFor(propertyEvents, m => m.value === 31, 'the property event');
      check(property.path === '/features/temp/properties/value' && property.action === 'modified',
        'the property event', summary(property));

      const merge = await features.patchProperties('temp', { unit: 'C' });
      check(merge.status === 204, 'patchProperties over HTTP while subscribed', merge.status);
      const merged = await waitFor(thingEvents, m => m.action === 'merged' && thingEvents.indexOf(m) > since,
        'the merged event');
      check(merged.topic === `${ns}/ws-1/things/twin/events/merged` && merged.path === '/features/temp/properties'
        && deepEqual(merged.value, { unit: 'C' }), 'the merged event', summary(merged));

      const del = await http.things.deleteAttribute(thingId, 'site');
      check(del.status === 204, 'deleteAttribute over HTTP while subscribed', del.status);
      const deleted = await waitFor(thingEvents, m => m.action === 'deleted' && m.path === '/attributes/site',
        'the deleted event');
      check(thingEvents.indexOf(deleted) > since, 'the deleted event after the others', summary(deleted));

      const order = after().map(m => `${m.action} ${m.path}`);
      check(deepEqual(order, ['modified /attributes/level', 'modified /features/temp/properties/value',
        'merged /features/temp/properties', 'deleted /attributes/site']), 'each change once, in order', order);
      const all = () => allEvents.filter(m => m.topic.startsWith(`${ns}/ws-1/`));
      await waitFor(allEvents, () => all().length >= thingEvents.length, 'every event to the catch-all subscription');
      await events.stopEvents();
      return {
        thing: after().map(summary), property: propertyEvents.filter(m => m.value === 31).map(summary),
        earlier: since, all: all().length - since,
      };
    });

    await step('ws_delete', async () => {
      const r = await things.deleteThing(thingId);
      check(r.status === 204, 'deleteThing over WebSocket is 204', r.status);
      const gone = await errorOf(things.getThing(thingId));
      check(!gone.resolved, 'getThing of a deleted thing over WebSocket is rejected', gone);
      const error = gone.error.body;
      check(error && error.status === 404 && error.error === 'things:thing.notfound',
        'the rejection over WebSocket is Ditto\'s error body', gone.error);
      return { status: r.status, error: error.error, errorStatus: error.status };
    });
  } finally {
    closing = true;
    client.close();
  }
}

async function bearer() {
  // Authorization: Bearer <jwt> on HTTP requests and on the WebSocket upgrade.
  const auth = () => NodeHttpBearerAuth.newInstance(new DefaultTokenSupplier(token));
  const client = DittoNodeClient.newHttpClient().withoutTls().withDomain(domain).withAuthProvider(auth()).build();
  const things = client.getThingsHandle();
  const thingId = `${ns}:jwt-1`;
  await step('jwt_http', async () => {
    const r = await things.putThing(new Thing(thingId, undefined, { owner: 'jwt' }));
    check(r.status === 201, 'putThing with a bearer token', r.status);
    const policy = (await client.getPoliciesHandle().getPolicy(thingId)).toObject();
    const thing = await things.getThing(thingId);
    return { status: r.status, attributes: thing.attributes, subjects: Object.keys(policy.entries.DEFAULT.subjects) };
  });
  const ws = DittoNodeClient.newWebSocketClient().withoutTls().withDomain(domain).withAuthProvider(auth())
    .withBuffer(16).twinChannel().withReconnect(false).build();
  try {
    await step('jwt_ws', async () => {
      const thing = await ws.getThingsHandle().getThing(thingId);
      const events = ws.getEventsHandle();
      await events.requestEvents();
      const received = [];
      events.subscribeToAttribute(thingId, 'owner', message => received.push(message));
      await things.putAttribute(thingId, 'owner', 'jwt-2');
      const event = await waitFor(received, m => m.value === 'jwt-2', 'the event over the bearer-token socket');
      await events.stopEvents();
      return { attributes: thing.attributes, event: { action: event.action, path: event.path, value: event.value } };
    });
  } finally {
    closing = true;
    ws.close();
  }
  await things.deleteThing(thingId);
}

async function main() {
  if (token) {
    await bearer();
  } else {
    await websocket(await http());
  }
  process.stdout.write(JSON.stringify(results) + '\n');
}

// The client rejects a promise nobody handles when a socket built withReconnect(false) closes,
// also after its own close() ('Reconnect disabled', node-websocket.js reconnect()). That one is
// expected; any other unhandled rejection fails the run.
process.on('unhandledRejection', reason => {
  if (reason === 'Reconnect disabled' && closing) {
    return;
  }
  process.stderr.write(`unhandled rejection: ${reason instanceof Error ? reason.stack : JSON.stringify(reason)}\n`);
  process.stdout.write(JSON.stringify(results) + '\n');
  process.exit(1);
});

main().then(
  () => process.exit(0),
  error => {
    process.stderr.write(`${error instanceof Error ? error.message : JSON.stringify(error)}\n`);
    process.stdout.write(JSON.stringify(results) + '\n');
    process.exit(1);
  },
);
