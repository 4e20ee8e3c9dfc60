//! Registry client for upstream registries: auth challenges, redirects to object storage, retries, resumable blob downloads.
