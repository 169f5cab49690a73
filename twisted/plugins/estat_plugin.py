from twisted.application.service import ServiceMaker

estat = ServiceMaker(
    "Estat ingest server", "estat.tap", "Collect events over HTTP into S3 as gzip JSON Lines.", "estat"
)
