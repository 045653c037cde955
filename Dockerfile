FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY agents agents
COPY sinks sinks
COPY schemas schemas
RUN pip install --no-cache-dir .
ENV LOOPLINE_WEB_HOST=0.0.0.0 \
    LOOPLINE_DATA_DIR=/var/lib/loopline
ENTRYPOINT ["loopline"]
CMD ["worker"]
