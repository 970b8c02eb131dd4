"""The binding of operationIds to handlers: one explicit map, checked against the spec when
the app is built."""

from __future__ import annotations

from impl.api.handlers import (
    conversations,
    documents,
    events,
    health,
    ingestion,
    keys,
    openai_compat,
    operations,
    retrieval,
    streaming,
    webhooks,
)
from impl.api.routing import Handler

HANDLERS: dict[str, Handler] = {
    "getHealth": health.get_health,
    "getReadiness": health.get_readiness,
    "ingestDocuments": ingestion.ingest_documents,
    "getJob": ingestion.get_job,
    "listJobs": ingestion.list_jobs,
    "cancelJob": ingestion.cancel_job,
    "streamJobEvents": events.stream_job_events,
    "listDocuments": documents.list_documents,
    "getDocument": documents.get_document,
    "replaceDocument": documents.replace_document,
    "patchDocument": documents.patch_document,
    "reindexDocument": documents.reindex_document,
    "deleteDocument": documents.delete_document,
    "listDocumentChunks": documents.list_document_chunks,
    "searchChunks": retrieval.search_chunks,
    "queryDocuments": retrieval.query_documents,
    "streamQuery": streaming.stream_query,
    "getMetrics": operations.get_metrics,
    "reindexTenant": operations.reindex_tenant,
    "getTenantIndex": operations.get_tenant_index,
    "listApiKeys": keys.list_api_keys,
    "createApiKey": keys.create_api_key,
    "revokeApiKey": keys.revoke_api_key,
    "listWebhooks": webhooks.list_webhooks,
    "createWebhook": webhooks.create_webhook,
    "getWebhook": webhooks.get_webhook,
    "deleteWebhook": webhooks.delete_webhook,
    "createConversation": conversations.create_conversation,
    "listConversations": conversations.list_conversations,
    "getConversation": conversations.get_conversation,
    "deleteConversation": conversations.delete_conversation,
    "postConversationMessage": conversations.post_conversation_message,
    "listModels": openai_compat.list_models,
    "createChatCompletion": openai_compat.create_chat_completion,
}
