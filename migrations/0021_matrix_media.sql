-- Pictures the Matrix adapter uploaded to its homeserver's media repository (persona avatars),
-- by the account that uploaded them and the SHA-256 of their bytes: after a restart the same
-- picture is found here and its mxc URI used again, instead of a new upload every time the
-- bot starts. A changed picture has another digest, and is uploaded once more.
CREATE TABLE matrix_media (
    account     text NOT NULL,
    sha256      text NOT NULL,
    mxc         text NOT NULL,
    uploaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, sha256)
);
