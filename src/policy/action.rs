//! One action per RPC of `proto/keyward/v1/*.proto` (`StreamEvents` asks for `ReadAudit`).

/// What a caller asks to do: one per RPC, named like it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// AccountService.CreateAccount
    CreateAccount,
    /// AccountService.GetAccount
    GetAccount,
    /// AccountService.GetAccountJwks (public keys)
    GetAccountJwks,
    /// AccountService.ListAccounts
    ListAccounts,
    /// AccountService.UpdateAccount
    UpdateAccount,
    /// AccountService.FreezeAccount
    FreezeAccount,
    /// AccountService.UnfreezeAccount
    UnfreezeAccount,
    /// AccountService.DeleteAccount
    DeleteAccount,
    /// AccountService.RotateAccountKeys
    RotateAccountKeys,
    /// AccountService.ChangeController
    ChangeController,
    /// AccountService.CancelControllerChange
    CancelControllerChange,
    /// AccountService.CreateImportJob
    CreateImportJob,
    /// AccountService.ImportAccount
    ImportAccount,
    /// SigningService.SignTypedData
    SignTypedData,
    /// SigningService.SignMessage
    SignMessage,
    /// SigningService.SignPayment
    SignPayment,
    /// SigningService.SignReceipt
    SignReceipt,
    /// SigningService.SignAttestation
    SignAttestation,
    /// SigningService.SignTransaction
    SignTransaction,
    /// SessionService.CreateSessionChallenge
    CreateSessionChallenge,
    /// SessionService.OpenSession
    OpenSession,
    /// SessionService.GetSession
    GetSession,
    /// SessionService.ListSessions
    ListSessions,
    /// SessionService.RevokeSession
    RevokeSession,
    /// JwksService.GetJwks (public keys)
    GetJwks,
    /// JwksService.ListIssuerKeys
    ListIssuerKeys,
    /// JwksService.RotateIssuerKey
    RotateIssuerKey,
    /// JwksService.RevokeIssuerKey
    RevokeIssuerKey,
    /// AuditService.StreamEvents: reading the audit log.
    ReadAudit,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 29] = [
        Action::CreateAccount,
        Action::GetAccount,
        Action::GetAccountJwks,
        Action::ListAccounts,
        Action::UpdateAccount,
        Action::FreezeAccount,
        Action::UnfreezeAccount,
        Action::DeleteAccount,
        Action::RotateAccountKeys,
        Action::ChangeController,
        Action::CancelControllerChange,
        Action::CreateImportJob,
        Action::ImportAccount,
        Action::SignTypedData,
        Action::SignMessage,
        Action::SignPayment,
        Action::SignReceipt,
        Action::SignAttestation,
        Action::SignTransaction,
        Action::CreateSessionChallenge,
        Action::OpenSession,
        Action::GetSession,
        Action::ListSessions,
        Action::RevokeSession,
        Action::GetJwks,
        Action::ListIssuerKeys,
        Action::RotateIssuerKey,
        Action::RevokeIssuerKey,
        Action::ReadAudit,
    ];

    /// The Cedar action id (`Keyward::Action::"<name>"`), which is the RPC name.
    pub fn name(self) -> &'static str {
        match self {
            Action::CreateAccount => "CreateAccount",
            Action::GetAccount => "GetAccount",
            Action::GetAccountJwks => "GetAccountJwks",
            Action::ListAccounts => "ListAccounts",
            Action::UpdateAccount => "UpdateAccount",
            Action::FreezeAccount => "FreezeAccount",
            Action::UnfreezeAccount => "UnfreezeAccount",
            Action::DeleteAccount => "DeleteAccount",
            Action::RotateAccountKeys => "RotateAccountKeys",
            Action::ChangeController => "ChangeController",
            Action::CancelControllerChange => "CancelControllerChange",
            Action::CreateImportJob => "CreateImportJob",
            Action::ImportAccount => "ImportAccount",
            Action::SignTypedData => "SignTypedData",
            Action::SignMessage => "SignMessage",
            Action::SignPayment => "SignPayment",
            Action::SignReceipt => "SignReceipt",
            Action::SignAttestation => "SignAttestation",
            Action::SignTransaction => "SignTransaction",
            Action::CreateSessionChallenge => "CreateSessionChallenge",
            Action::OpenSession => "OpenSession",
            Action::GetSession => "GetSession",
            Action::ListSessions => "ListSessions",
            Action::RevokeSession => "RevokeSession",
            Action::GetJwks => "GetJwks",
            Action::ListIssuerKeys => "ListIssuerKeys",
            Action::RotateIssuerKey => "RotateIssuerKey",
            Action::RevokeIssuerKey => "RevokeIssuerKey",
            Action::ReadAudit => "ReadAudit",
        }
    }

    /// The schema's action group it belongs to, if any.
    pub fn group(self) -> Option<&'static str> {
        match self {
            Action::GetAccountJwks | Action::GetJwks => Some("PublicKeys"),
            Action::SignTypedData
            | Action::SignMessage
            | Action::SignPayment
            | Action::SignReceipt
            | Action::SignAttestation
            | Action::SignTransaction => Some("Sign"),
            Action::CreateSessionChallenge
            | Action::OpenSession
            | Action::ListSessions
            | Action::GetSession
            | Action::RevokeSession => Some("ManageSessions"),
            Action::ListIssuerKeys | Action::RotateIssuerKey | Action::RevokeIssuerKey => Some("IssuerKeys"),
            Action::UpdateAccount
            | Action::FreezeAccount
            | Action::UnfreezeAccount
            | Action::DeleteAccount
            | Action::RotateAccountKeys
            | Action::CancelControllerChange => Some("ManageAccounts"),
            Action::ChangeController | Action::CreateImportJob | Action::ImportAccount => None,
            Action::ListAccounts => None,
            Action::CreateAccount | Action::GetAccount | Action::ReadAudit => None,
        }
    }

    /// Whether a frozen account refuses this action: everything that signs with its keys or
    /// opens a session on it.
    pub fn needs_unfrozen(self) -> bool {
        self.group() == Some("Sign") || matches!(self, Action::CreateSessionChallenge | Action::OpenSession)
    }

    /// The action an RPC asks the decision point for: its own name, except
    /// `StreamEvents`, which is `ReadAudit`.
    pub fn for_rpc(rpc: &str) -> Option<Action> {
        match rpc {
            "StreamEvents" => Some(Action::ReadAudit),
            _ => Action::from_name(rpc),
        }
    }

    /// The action named `name`.
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }
}
