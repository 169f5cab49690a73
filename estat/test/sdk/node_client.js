// Drives the real @segment/analytics-node against an Estat server, for
// estat/test/test_e2e_segment.py.  Environment: ESTAT_HOST (the server's
// URL), WRITE_KEY, COUNT (track calls).  Prints one JSON object: the
// messageIds it sent, the HTTP statuses it got and every error it emitted.
'use strict'

const { Analytics } = require('@segment/analytics-node')

async function main() {
  const count = parseInt(process.env.COUNT || '10', 10)
  const analytics = new Analytics({
    writeKey: process.env.WRITE_KEY,
    host: process.env.ESTAT_HOST,
    flushAt: 4,
    flushInterval: 200,
    maxRetries: 3,
  })
  const sent = []
  const statuses = []
  const errors = []
  analytics.on('http_request', (request) => {
    for (const message of JSON.parse(request.body).batch) sent.push(message.messageId)
  })
  analytics.on('http_response', (response) => statuses.push(response.status))
  analytics.on('error', (err) => errors.push(String((err && err.reason) || err)))

  for (let i = 0; i < count; i++) {
    analytics.track({
      userId: 'node-user',
      event: 'Node Event',
      properties: { index: i, runtime: 'node' },
    })
  }
  analytics.identify({ userId: 'node-user', traits: { plan: 'pro' } })
  await analytics.closeAndFlush({ timeout: 20000 })
  process.stdout.write(JSON.stringify({ sent, statuses, errors }) + '\n')
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ sent: [], statuses: [], errors: ['crash: ' + err] }) + '\n')
  process.exit(1)
})
